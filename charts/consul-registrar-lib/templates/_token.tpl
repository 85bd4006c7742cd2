{{/*
The drain token: the credential the app's preStop hook sends as X-Drain-Token and the sidecar
requires on /drain (CONSUL_REGISTRAR_DRAIN_TOKEN, from the Secret below). config.drainToken.value
when set; else the value in the Secret a previous release created (`lookup`), so upgrades keep it
and do not roll the pods; else 32 random characters. The header is a literal in the pod spec:
whoever can read the pod spec can read the token.

A render calls this more than once (the Secret, each pod template): the first answer is kept in
the calling chart's .Values, under a key no schema declares, so every call agrees.
*/}}
{{- define "consul-registrar-lib.drainToken" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $values := .context.Values }}
{{- $secretName := include "consul-registrar-lib.drainTokenSecretName" . }}
{{- $memo := get $values "__consulRegistrarDrainTokens" | default dict }}
{{- if not (hasKey $memo $secretName) }}
{{- $token := .resolved.drainToken.value | toString }}
{{- if not $token }}
{{- $existing := lookup "v1" "Secret" .context.Release.Namespace $secretName }}
{{- if and $existing $existing.data (hasKey $existing.data "token") }}
{{- $token = index $existing.data "token" | b64dec }}
{{- else }}
{{- $token = randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9._~+/=-]{16,}$" $token) }}
{{- fail "consul-registrar drainToken.value must be at least 16 characters of A-Z a-z 0-9 . _ ~ + / = - (it is sent as an HTTP header)" }}
{{- end }}
{{- $_ := set $memo $secretName $token }}
{{- $_ := set $values "__consulRegistrarDrainTokens" $memo }}
{{- end }}
{{- get $memo $secretName }}
{{- end }}

{{/* The Secret holding the drain token (key `token`). Pass "labels" in the dict to label it. */}}
{{- define "consul-registrar-lib.drainTokenSecret" -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "consul-registrar-lib.drainTokenSecretName" . }}
  {{- with .labels }}
  labels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
type: Opaque
data:
  token: {{ include "consul-registrar-lib.drainToken" . | b64enc | quote }}
{{- end }}
