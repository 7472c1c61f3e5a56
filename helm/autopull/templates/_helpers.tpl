{{/*
Name of the chart, or nameOverride, cut to the 63 characters a label allows.
*/}}
{{- define "autopull.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else the release name,
with the chart name appended unless the release name already contains it.
*/}}
{{- define "autopull.fullname" -}}
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
Name of the headless Service that gives each worker pod a stable DNS name.
*/}}
{{- define "autopull.headlessName" -}}
{{- printf "%s-headless" (include "autopull.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, as the helm.sh/chart label.
*/}}
{{- define "autopull.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the worker pods. They must not change between releases,
because a StatefulSet's selector is immutable.
*/}}
{{- define "autopull.selectorLabels" -}}
app.kubernetes.io/name: {{ include "autopull.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
Labels of every object of the release.
*/}}
{{- define "autopull.labels" -}}
helm.sh/chart: {{ include "autopull.chart" . }}
{{ include "autopull.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: autopull
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the ServiceAccount the pods run as.
*/}}
{{- define "autopull.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "autopull.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "autopull.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Bootstrap servers. values.schema.json already requires them; `required` keeps
the message clear when schema validation is skipped.
*/}}
{{- define "autopull.kafkaBootstrap" -}}
{{- required "kafka.bootstrap is required: set it to the bootstrap servers of an existing Kafka cluster, for example --set kafka.bootstrap=kafka.example.svc:9092." .Values.kafka.bootstrap }}
{{- end }}
