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

{{/*
Labels of the `helm test` Pod: NOT the workload's selector labels. A DaemonSet (or a bare
ReplicaSet) adopts any orphan pod its selector matches and deletes it as a surplus pod: on a real
kubelet, `helm test` of kind=DaemonSet failed with the test pod "Deleted pod" by the DaemonSet.
*/}}
{{- define "my-app.testLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: registrar-validate
{{- end }}

{{/* The one argument every consul-registrar-lib template takes. */}}
{{- define "my-app.registrar" -}}
{{- $config := deepCopy .Values.consulRegistrar }}
{{- $_ := set $config "name" (include "my-app.fullname" .) }}
{{- $_ := set $config "appShutdownSeconds" .Values.shutdownSeconds }}
{{- toJson $config }}
{{- end }}
