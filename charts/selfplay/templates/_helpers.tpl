{{/*
Names. The operator's objects are "<fullname>-operator"; with the release named "selfplay"
in namespace "selfplay-system" that is "selfplay-operator", the name the operator's
built-in broker address assumes.
*/}}
{{- define "selfplay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selfplay.fullname" -}}
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

{{- define "selfplay.operatorName" -}}
{{- printf "%s-operator" (include "selfplay.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "selfplay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "selfplay.labels" -}}
helm.sh/chart: {{ include "selfplay.chart" . }}
{{ include "selfplay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selfplay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator pods' selector: stable across upgrades, never add to it. */}}
{{- define "selfplay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfplay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "selfplay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "selfplay.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest]; the tag defaults to the chart's appVersion. */}}
{{- define "selfplay.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "selfplay.leaseName" -}}
{{- default (include "selfplay.operatorName" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The address trainer pods dial to reach the broker. */}}
{{- define "selfplay.brokerAddress" -}}
{{- if .Values.broker.address }}
{{- .Values.broker.address }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "selfplay.operatorName" .) .Release.Namespace (int .Values.broker.port) }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches (a JSON list): watchNamespaces, or the release namespace
when it is empty; empty with clusterWide (all namespaces).
*/}}
{{- define "selfplay.watchNamespaces" -}}
{{- if .Values.clusterWide -}}
{{- list | toJson -}}
{{- else if .Values.watchNamespaces -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end }}
