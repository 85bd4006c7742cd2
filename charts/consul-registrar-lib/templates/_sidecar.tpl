{{/*
The pieces of a pod spec: the sidecar container (native or classic), the app's preStop hook and
the volumes. Each renders YAML to be placed with nindent at the spot its comment names.
*/}}

{{/* The sidecar's env: the Downward API, Consul's own client variables, the drain token, extraEnv. */}}
{{- define "consul-registrar-lib.sidecarEnv" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved -}}
# The Downward API: the manifest's defaults and ${VAR}s read these.
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_UID
  valueFrom:
    fieldRef:
      fieldPath: metadata.uid
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
# Consul's own client variables (after HOST_IP, so that $(HOST_IP) expands).
- name: CONSUL_HTTP_ADDR
  value: {{ include "consul-registrar-lib.consulAddress" . | quote }}
{{- if $c.consul.aclToken.secretName }}
- name: CONSUL_HTTP_TOKEN_FILE
  value: {{ printf "%s/%s" (include "consul-registrar-lib.aclDir" .) $c.consul.aclToken.secretKey | quote }}
{{- end }}
{{- if $c.consul.tls.enabled }}
- name: CONSUL_HTTP_SSL
  value: "true"
{{- end }}
{{- if $c.consul.tls.caSecretName }}
- name: CONSUL_CACERT
  value: {{ printf "%s/%s" (include "consul-registrar-lib.caDir" .) $c.consul.tls.caSecretKey | quote }}
{{- end }}
{{- if $c.consul.tls.clientSecretName }}
- name: CONSUL_CLIENT_CERT
  value: {{ printf "%s/%s" (include "consul-registrar-lib.clientTlsDir" .) $c.consul.tls.clientCertKey | quote }}
- name: CONSUL_CLIENT_KEY
  value: {{ printf "%s/%s" (include "consul-registrar-lib.clientTlsDir" .) $c.consul.tls.clientKeyKey | quote }}
{{- end }}
{{- with $c.consul.tls.serverName }}
- name: CONSUL_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- if $c.consul.tls.insecureSkipVerify }}
- name: CONSUL_HTTP_SSL_VERIFY
  value: "false"
{{- end }}
{{- with $c.consul.namespace }}
- name: CONSUL_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- with $c.consul.partition }}
- name: CONSUL_PARTITION
  value: {{ . | quote }}
{{- end }}
# The credential /drain requires (the app's preStop hook sends it as X-Drain-Token).
- name: CONSUL_REGISTRAR_DRAIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "consul-registrar-lib.drainTokenSecretName" . }}
      key: token
{{- with $c.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The sidecar's volume mounts: the manifest, and the token and TLS Secrets when set. */}}
{{- define "consul-registrar-lib.sidecarVolumeMounts" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved -}}
- name: consul-registrar-manifest
  mountPath: {{ include "consul-registrar-lib.manifestDir" . }}
  readOnly: true
{{- if $c.consul.aclToken.secretName }}
- name: consul-registrar-acl-token
  mountPath: {{ include "consul-registrar-lib.aclDir" . }}
  readOnly: true
{{- end }}
{{- if $c.consul.login.authMethod }}
- name: consul-registrar-login
  mountPath: {{ include "consul-registrar-lib.loginDir" . }}
  readOnly: true
{{- end }}
{{- if $c.consul.tls.caSecretName }}
- name: consul-registrar-ca
  mountPath: {{ include "consul-registrar-lib.caDir" . }}
  readOnly: true
{{- end }}
{{- if $c.consul.tls.clientSecretName }}
- name: consul-registrar-client-tls
  mountPath: {{ include "consul-registrar-lib.clientTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The sidecar container (one list item's body, without the "- "). A native sidecar carries
restartPolicy: Always and belongs in initContainers; a classic one in containers. Prefer
`consul-registrar-lib.initContainers` / `consul-registrar-lib.containers`, which place it.
*/}}
{{- define "consul-registrar-lib.sidecarContainer" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved -}}
name: consul-registrar
image: {{ include "consul-registrar-lib.image" . | quote }}
imagePullPolicy: {{ $c.image.pullPolicy }}
{{- if $c.native }}
restartPolicy: Always
{{- end }}
args:
  - run
  - --manifest
  - {{ printf "%s/manifest.yaml" (include "consul-registrar-lib.manifestDir" .) }}
  - --admin-addr
  - {{ include "consul-registrar-lib.adminAddress" . | quote }}
  - --log-format
  - {{ $c.logFormat }}
  - --log-level
  - {{ $c.logLevel | quote }}
env:
  {{- include "consul-registrar-lib.sidecarEnv" . | nindent 2 }}
ports:
  - name: registrar-admin
    containerPort: {{ int $c.adminPort }}
    protocol: TCP
{{- with $c.startupProbe }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  {{- include "consul-registrar-lib.sidecarVolumeMounts" . | nindent 2 }}
{{- end }}

{{/* List items for the pod's initContainers: the native sidecar, or nothing. Put first, before your own init containers. */}}
{{- define "consul-registrar-lib.initContainers" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- if .resolved.native -}}
- {{ include "consul-registrar-lib.sidecarContainer" . | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/* List items for the pod's containers: the classic sidecar, or nothing. */}}
{{- define "consul-registrar-lib.containers" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- if not .resolved.native -}}
- {{ include "consul-registrar-lib.sidecarContainer" . | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/*
The app container's lifecycle: a preStop GET of the sidecar's /drain?wait=true with the drain
token. The instance turns critical, is deregistered after the drain delay, and only then does the
GET return and the app get SIGTERM. The kubelet sends it to the pod IP, hence the port number (a
name would be looked up among the app container's own ports). Place under the app container's
`lifecycle:`.
*/}}
{{- define "consul-registrar-lib.preStop" -}}
{{- include "consul-registrar-lib.resolve" . -}}
preStop:
  httpGet:
    path: /drain?wait=true
    port: {{ int .resolved.adminPort }}
    scheme: HTTP
    httpHeaders:
      - name: X-Drain-Token
        value: {{ include "consul-registrar-lib.drainToken" . | quote }}
{{- end }}

{{/* List items for the pod's volumes: the manifest ConfigMap, and the token and TLS Secrets when set. */}}
{{- define "consul-registrar-lib.volumes" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved -}}
- name: consul-registrar-manifest
  configMap:
    name: {{ include "consul-registrar-lib.manifestConfigMapName" . }}
    items:
      - key: {{ include "consul-registrar-lib.manifestKey" . }}
        path: manifest.yaml
{{- if $c.consul.aclToken.secretName }}
- name: consul-registrar-acl-token
  secret:
    secretName: {{ $c.consul.aclToken.secretName }}
    items:
      - key: {{ $c.consul.aclToken.secretKey }}
        path: {{ $c.consul.aclToken.secretKey }}
{{- end }}
{{- with $c.consul.login }}{{ if .authMethod }}
- name: consul-registrar-login
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ int (default 3600 .expirationSeconds) }}
          {{- with .audience }}
          audience: {{ . | quote }}
          {{- end }}
{{- end }}{{ end }}
{{- if $c.consul.tls.caSecretName }}
- name: consul-registrar-ca
  secret:
    secretName: {{ $c.consul.tls.caSecretName }}
    items:
      - key: {{ $c.consul.tls.caSecretKey }}
        path: {{ $c.consul.tls.caSecretKey }}
{{- end }}
{{- if $c.consul.tls.clientSecretName }}
- name: consul-registrar-client-tls
  secret:
    secretName: {{ $c.consul.tls.clientSecretName }}
    items:
      - key: {{ $c.consul.tls.clientCertKey }}
        path: {{ $c.consul.tls.clientCertKey }}
      - key: {{ $c.consul.tls.clientKeyKey }}
        path: {{ $c.consul.tls.clientKeyKey }}
{{- end }}
{{- end }}
