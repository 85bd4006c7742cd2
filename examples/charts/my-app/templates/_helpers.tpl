{{- define "my-app.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "my-app.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "my-app.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "my-app.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The one argument every consul-registrar-lib template takes. */}}
{{- define "my-app.registrar" -}}
{{- $config := deepCopy .Values.consulRegistrar }}
{{- $_ := set $config "name" (include "my-app.fullname" .) }}
{{- $_ := set $config "appShutdownSeconds" .Values.shutdownSeconds }}
{{- toJson $config }}
{{- end }}
