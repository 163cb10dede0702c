{{/*
The chart name, overridable with nameOverride; DNS labels are limited to 63 characters.
*/}}
{{- define "pilotfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name prefix of every object: the release name alone when it already contains the chart name,
so `helm install pilotfleet ...` gives `pilotfleet-operator`, not `pilotfleet-pilotfleet-operator`.
Truncated to 63 characters because some fields (Service names) are DNS labels.
*/}}
{{- define "pilotfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A component's object name: the fullname truncated so that "-<component>" still fits in 63 characters.
Call with (dict "context" $ "component" "operator").
*/}}
{{- define "pilotfleet.componentName" -}}
{{- $suffix := printf "-%s" .component }}
{{- $prefix := include "pilotfleet.fullname" .context | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $prefix $suffix }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "pilotfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object. They mirror pilotfleet_operator's naming module: app.kubernetes.io/{name,
instance, component, part-of, managed-by}. Call with (dict "context" $ "component" "proxy").
*/}}
{{- define "pilotfleet.labels" -}}
helm.sh/chart: {{ include "pilotfleet.chart" .context }}
{{ include "pilotfleet.selectorLabels" . }}
{{- with .context.Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/part-of: pilotfleet
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
{{- with .context.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: minimal and never changed by an upgrade (a Deployment's selector is immutable).
Call with (dict "context" $ "component" "proxy").
*/}}
{{- define "pilotfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pilotfleet.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "pilotfleet.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "pilotfleet.componentName" (dict "context" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The proxy's ServiceAccount name (it holds no permissions and its token is never mounted).
*/}}
{{- define "pilotfleet.proxyServiceAccountName" -}}
{{- if .Values.proxy.serviceAccount.create }}
{{- default (include "pilotfleet.componentName" (dict "context" . "component" "proxy")) .Values.proxy.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.proxy.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The route-table ConfigMap the operator publishes in its namespace and every proxy pod mounts: a fixed
name, the same as pilotfleet_operator.naming.ROUTES_CONFIGMAP (docs/architecture.md).
*/}}
{{- define "pilotfleet.routesConfigMapName" -}}
pilotfleet-routes
{{- end }}

{{/*
The image both components run: repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "pilotfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Leader election is on when asked for, and always when more than one operator replica runs.
*/}}
{{- define "pilotfleet.leaderElection" -}}
{{- if or .Values.operator.leaderElection.enabled (gt (int .Values.operator.replicas) 1) }}true{{- end }}
{{- end }}

{{/*
The URL clients use: the ingress when enabled, else the in-cluster Service.
*/}}
{{- define "pilotfleet.proxyURL" -}}
{{- if .Values.proxy.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" .Values.proxy.ingress.tls.enabled) .Values.proxy.ingress.host }}
{{- else }}
{{- $host := printf "%s.%s.svc" (include "pilotfleet.componentName" (dict "context" . "component" "proxy")) .Release.Namespace }}
{{- if eq (int .Values.proxy.service.port) 80 }}
{{- printf "http://%s" $host }}
{{- else }}
{{- printf "http://%s:%d" $host (int .Values.proxy.service.port) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The coordination.k8s.io Lease the operator replicas compete for.
*/}}
{{- define "pilotfleet.leaseName" -}}
{{- default (include "pilotfleet.componentName" (dict "context" . "component" "operator")) .Values.operator.leaderElection.leaseName }}
{{- end }}
