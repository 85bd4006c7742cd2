{{/*
A `helm test` Pod that runs `consul-registrar validate` on the manifest the release mounts, with
the sidecar's own env (but the drain token) and files: `helm test <release>` fails when the
sidecar would refuse the manifest. Pass "labels" in the dict to label it, "podSecurityContext" to
set the pod's, "imagePullSecrets". The labels must not match your workload's selector: a
DaemonSet (or a bare ReplicaSet) adopts an orphan pod its selector matches and deletes it, and
`helm test` fails.

With "onInstall" true in the dict it is a pre-install/pre-upgrade hook instead, reading the
manifest from the hook ConfigMap `consul-registrar-lib.configMap` renders with the same flag: a
manifest the sidecar would refuse then fails `helm install`/`helm upgrade` before any pod changes.
*/}}
{{- define "consul-registrar-lib.testPod" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ printf "%s-registrar-validate%s" $c.name (ternary "-install" "" (.onInstall | default false)) | trunc 63 | trimSuffix "-" }}
  {{- with .labels }}
  labels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  annotations:
    {{- if .onInstall }}
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-5"
    {{- else }}
    helm.sh/hook: test
    {{- end }}
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
      {{- /* validate needs no drain token, and before an install its Secret does not exist yet. */}}
      {{- $env := list }}
      {{- range include "consul-registrar-lib.sidecarEnv" . | fromYamlArray }}
      {{- if ne .name "CONSUL_REGISTRAR_DRAIN_TOKEN" }}{{ $env = append $env . }}{{ end }}
      {{- end }}
      env:
        {{- toYaml $env | nindent 8 }}
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
