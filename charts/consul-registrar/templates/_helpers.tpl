{{/*
Names, labels, images, the generated manifest and the shutdown-budget check. Everything the
templates share lives here; the templates themselves only assemble.
*/}}

{{- define "consul-registrar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The workload's name: fullnameOverride, else <release>-<chart> (or <release> if it contains the chart name). */}}
{{- define "consul-registrar.fullname" -}}
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

{{- define "consul-registrar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "consul-registrar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consul-registrar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "consul-registrar.labels" -}}
helm.sh/chart: {{ include "consul-registrar.chart" . }}
{{ include "consul-registrar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "consul-registrar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "consul-registrar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest, else repository:tag (tag defaulting to the chart's appVersion). Call with (list image ctx). */}}
{{- define "consul-registrar.image" -}}
{{- $image := index . 0 }}
{{- $ctx := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $ctx.Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/* The name of the ConfigMap holding the manifest, and the key inside it. */}}
{{- define "consul-registrar.manifestConfigMap" -}}
{{- default (printf "%s-manifest" (include "consul-registrar.fullname" .)) .Values.manifest.existingConfigMap }}
{{- end }}

{{- define "consul-registrar.manifestKey" -}}
{{- if .Values.manifest.existingConfigMap }}{{ .Values.manifest.existingConfigMapKey }}{{ else }}manifest.yaml{{ end }}
{{- end }}

{{/* Where the sidecar finds its files. */}}
{{- define "consul-registrar.manifestDir" -}}/etc/consul-registrar{{- end }}
{{- define "consul-registrar.aclDir" -}}/var/run/secrets/consul-registrar/acl{{- end }}
{{- define "consul-registrar.caDir" -}}/var/run/secrets/consul-registrar/ca{{- end }}
{{- define "consul-registrar.clientTlsDir" -}}/var/run/secrets/consul-registrar/client-tls{{- end }}

{{/* host:port for the admin server; IPv6 hosts get brackets. */}}
{{- define "consul-registrar.adminAddress" -}}
{{- $host := .Values.sidecar.adminBindAddress | toString }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int .Values.sidecar.adminPort) }}
{{- else }}
{{- printf "%s:%d" $host (int .Values.sidecar.adminPort) }}
{{- end }}
{{- end }}

{{- define "consul-registrar.consulAddress" -}}
{{- if .Values.consul.address }}
{{- .Values.consul.address }}
{{- else if .Values.consul.tls.enabled }}
{{- "https://$(HOST_IP):8501" }}
{{- else }}
{{- "http://$(HOST_IP):8500" }}
{{- end }}
{{- end }}

{{/*
The generated manifest. Connection settings that Consul's own environment variables also carry
(address, namespace, partition) come from the sidecar's env; the token and TLS files are named
here as well as in the env so that the ConfigMap shows everything the sidecar reads.
*/}}
{{- define "consul-registrar.manifest" -}}
{{- $consul := deepCopy (default dict .Values.manifest.consul) }}
{{- with .Values.consul.datacenter }}{{ $_ := set $consul "datacenter" . }}{{ end }}
{{- if .Values.consul.aclToken.secretName }}
{{- $_ := set $consul "tokenFile" (printf "%s/%s" (include "consul-registrar.aclDir" .) .Values.consul.aclToken.secretKey) }}
{{- end }}
{{- $tls := dict }}
{{- if .Values.consul.tls.caSecretName }}
{{- $_ := set $tls "caFile" (printf "%s/%s" (include "consul-registrar.caDir" .) .Values.consul.tls.caSecretKey) }}
{{- end }}
{{- if .Values.consul.tls.clientSecretName }}
{{- $_ := set $tls "certFile" (printf "%s/%s" (include "consul-registrar.clientTlsDir" .) .Values.consul.tls.clientCertKey) }}
{{- $_ := set $tls "keyFile" (printf "%s/%s" (include "consul-registrar.clientTlsDir" .) .Values.consul.tls.clientKeyKey) }}
{{- end }}
{{- with .Values.consul.tls.serverName }}{{ $_ := set $tls "serverName" . }}{{ end }}
{{- if .Values.consul.tls.insecureSkipVerify }}{{ $_ := set $tls "insecureSkipVerify" true }}{{ end }}
{{- if $tls }}{{ $_ := set $consul "tls" $tls }}{{ end }}
{{- $manifest := dict "admin" (dict "address" (include "consul-registrar.adminAddress" .)) "drain" .Values.manifest.drain "services" .Values.manifest.services }}
{{- if $consul }}{{ $_ := set $manifest "consul" $consul }}{{ end }}
{{- toYaml $manifest }}
{{- end }}

{{/*
Seconds in a Go-style duration ("500ms", "5s", "1m30s"), rounded up. values.schema.json has
already checked the syntax.
*/}}
{{- define "consul-registrar.durationSeconds" -}}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h)" (toString .) -1 }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . | float64 }}
{{- $unit := regexReplaceAll "^[0-9]+(\\.[0-9]+)?" . "" }}
{{- $scale := get (dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "μs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit }}
{{- $total = addf $total (mulf $number $scale) }}
{{- end }}
{{- ceil $total | int }}
{{- end }}

{{/*
The pod's termination budget must cover the drain: the app's preStop hook blocks for the drain
delay (plus deregistration) before the app even gets SIGTERM. Fails the render otherwise.
*/}}
{{- define "consul-registrar.validateGracePeriod" -}}
{{- $delay := include "consul-registrar.durationSeconds" .Values.manifest.drain.delay | int }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $needed := add $delay (int .Values.drainGraceMarginSeconds) }}
{{- if lt $grace $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least the drain delay manifest.drain.delay (%s = %ds) plus drainGraceMarginSeconds (%d): the app's preStop hook waits out the drain before the app gets SIGTERM, and the kubelet kills the pod when the grace period runs out. Set terminationGracePeriodSeconds to %d or more, or shorten the drain delay." $grace (toString .Values.manifest.drain.delay) $delay (int .Values.drainGraceMarginSeconds) $needed) }}
{{- end }}
{{- end }}

{{/* Native sidecars (init containers with restartPolicy: Always) exist from Kubernetes 1.29 on. */}}
{{- define "consul-registrar.validateNativeSidecar" -}}
{{- if and .Values.sidecar.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.native=true needs Kubernetes 1.29 or later (this is %s): set sidecar.native=false to run the sidecar as a regular container" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}

{{/* The sidecar container (a native sidecar adds restartPolicy: Always in the Deployment). */}}
{{- define "consul-registrar.sidecarContainer" -}}
name: consul-registrar
image: {{ include "consul-registrar.image" (list .Values.sidecar.image .) | quote }}
imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
{{- if .Values.sidecar.native }}
restartPolicy: Always
{{- end }}
args:
  - run
  - --manifest
  - {{ printf "%s/manifest.yaml" (include "consul-registrar.manifestDir" .) }}
  - --admin-addr
  - {{ include "consul-registrar.adminAddress" . | quote }}
  - --log-format
  - {{ .Values.sidecar.logFormat }}
  - --log-level
  - {{ .Values.sidecar.logLevel | quote }}
env:
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
    value: {{ include "consul-registrar.consulAddress" . | quote }}
  {{- if .Values.consul.aclToken.secretName }}
  - name: CONSUL_HTTP_TOKEN_FILE
    value: {{ printf "%s/%s" (include "consul-registrar.aclDir" .) .Values.consul.aclToken.secretKey | quote }}
  {{- end }}
  {{- if .Values.consul.tls.enabled }}
  - name: CONSUL_HTTP_SSL
    value: "true"
  {{- end }}
  {{- if .Values.consul.tls.caSecretName }}
  - name: CONSUL_CACERT
    value: {{ printf "%s/%s" (include "consul-registrar.caDir" .) .Values.consul.tls.caSecretKey | quote }}
  {{- end }}
  {{- if .Values.consul.tls.clientSecretName }}
  - name: CONSUL_CLIENT_CERT
    value: {{ printf "%s/%s" (include "consul-registrar.clientTlsDir" .) .Values.consul.tls.clientCertKey | quote }}
  - name: CONSUL_CLIENT_KEY
    value: {{ printf "%s/%s" (include "consul-registrar.clientTlsDir" .) .Values.consul.tls.clientKeyKey | quote }}
  {{- end }}
  {{- with .Values.consul.tls.serverName }}
  - name: CONSUL_TLS_SERVER_NAME
    value: {{ . | quote }}
  {{- end }}
  {{- if .Values.consul.tls.insecureSkipVerify }}
  - name: CONSUL_HTTP_SSL_VERIFY
    value: "false"
  {{- end }}
  {{- with .Values.consul.namespace }}
  - name: CONSUL_NAMESPACE
    value: {{ . | quote }}
  {{- end }}
  {{- with .Values.consul.partition }}
  - name: CONSUL_PARTITION
    value: {{ . | quote }}
  {{- end }}
  {{- with .Values.sidecar.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: registrar-admin
    containerPort: {{ .Values.sidecar.adminPort }}
    protocol: TCP
{{- with .Values.sidecar.startupProbe }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.sidecar.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.sidecar.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.sidecar.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.sidecar.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: manifest
    mountPath: {{ include "consul-registrar.manifestDir" . }}
    readOnly: true
  {{- if .Values.consul.aclToken.secretName }}
  - name: consul-acl-token
    mountPath: {{ include "consul-registrar.aclDir" . }}
    readOnly: true
  {{- end }}
  {{- if .Values.consul.tls.caSecretName }}
  - name: consul-ca
    mountPath: {{ include "consul-registrar.caDir" . }}
    readOnly: true
  {{- end }}
  {{- if .Values.consul.tls.clientSecretName }}
  - name: consul-client-tls
    mountPath: {{ include "consul-registrar.clientTlsDir" . }}
    readOnly: true
  {{- end }}
{{- end }}
