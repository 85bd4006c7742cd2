{{/*
A `helm test` Pod that runs `consul-registrar validate` on the manifest the release mounts, with
the sidecar's own env and files: `helm test <release>` fails when the sidecar would refuse the
manifest. Pass "labels" in the dict to label it, "podSecurityContext" to set the pod's.
*/}}
{{- define "consul-registrar-lib.testPod" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ printf "%s-registrar-validate" $c.name | trunc 63 | trimSuffix "-" }}
  {{- with .labels }}
  labels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  {{- with .podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: validate-manifest
      image: {{ include "consul-registrar-lib.image" . | quote }}
      imagePullPolicy: {{ $c.image.pullPolicy }}
      args:
        - validate
        - --manifest
        - {{ printf "%s/manifest.yaml" (include "consul-registrar-lib.manifestDir" .) }}
      env:
        {{- include "consul-registrar-lib.sidecarEnv" . | nindent 8 }}
      {{- with $c.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "consul-registrar-lib.sidecarVolumeMounts" . | nindent 8 }}
  volumes:
    {{- include "consul-registrar-lib.volumes" . | nindent 4 }}
{{- end }}
