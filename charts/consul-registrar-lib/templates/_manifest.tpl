{{/*
The sidecar's manifest, generated from config.manifest and config.consul, the ConfigMap that
holds it, and its checksum (the manifest data only: nothing else about the release rolls pods).
*/}}

{{/*
The manifest document. Connection settings that Consul's own environment variables also carry
(address, namespace, partition) come from the sidecar's env; the token and TLS files are named
here as well as in the env so that the ConfigMap shows everything the sidecar reads.
*/}}
{{- define "consul-registrar-lib.manifest" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved }}
{{- $consul := deepCopy (default dict $c.manifest.consul) }}
{{- if eq (toString $c.consul.mode) "catalog" }}
{{- /* Only in catalog mode: an agent-mode manifest (and its checksum) stays as it was. */}}
{{- $_ := set $consul "mode" "catalog" }}
{{- $catalog := dict }}
{{- range $key, $value := default dict $c.consul.catalog }}
{{- if and $value (ne $key "sharedSession") }}{{ $_ := set $catalog $key (toString $value) }}{{ end }}
{{- end }}
{{- if (default dict $c.consul.catalog).sharedSession }}
{{- /* The other sidecars of the node reach this one's admin server on the pod IP. */}}
{{- $_ := set $catalog "sharedSession" (dict "advertise" (printf "${POD_IP}:%d" (int $c.adminPort))) }}
{{- end }}
{{- if $catalog }}{{ $_ := set $consul "catalog" $catalog }}{{ end }}
{{- end }}
{{- with $c.consul.datacenter }}{{ $_ := set $consul "datacenter" . }}{{ end }}
{{- if $c.consul.aclToken.secretName }}
{{- $_ := set $consul "tokenFile" (printf "%s/%s" (include "consul-registrar-lib.aclDir" .) $c.consul.aclToken.secretKey) }}
{{- end }}
{{- with $c.consul.login }}{{ if .authMethod }}
{{- $meta := dict "pod" "${POD_NAMESPACE}/${POD_NAME}" }}
{{- range $key, $value := default dict .meta }}{{ $_ := set $meta $key (toString $value) }}{{ end }}
{{- $login := dict "authMethod" .authMethod "bearerTokenFile" (printf "%s/token" (include "consul-registrar-lib.loginDir" $)) "meta" $meta }}
{{- with .namespace }}{{ $_ := set $login "namespace" . }}{{ end }}
{{- with .partition }}{{ $_ := set $login "partition" . }}{{ end }}
{{- $_ := set $consul "login" $login }}
{{- end }}{{ end }}
{{- $tls := dict }}
{{- if $c.consul.tls.caSecretName }}
{{- $_ := set $tls "caFile" (printf "%s/%s" (include "consul-registrar-lib.caDir" .) $c.consul.tls.caSecretKey) }}
{{- end }}
{{- if $c.consul.tls.clientSecretName }}
{{- $_ := set $tls "certFile" (printf "%s/%s" (include "consul-registrar-lib.clientTlsDir" .) $c.consul.tls.clientCertKey) }}
{{- $_ := set $tls "keyFile" (printf "%s/%s" (include "consul-registrar-lib.clientTlsDir" .) $c.consul.tls.clientKeyKey) }}
{{- end }}
{{- with $c.consul.tls.serverName }}{{ $_ := set $tls "serverName" . }}{{ end }}
{{- if $c.consul.tls.insecureSkipVerify }}{{ $_ := set $tls "insecureSkipVerify" true }}{{ end }}
{{- if $tls }}{{ $_ := set $consul "tls" $tls }}{{ end }}
{{- $manifest := dict "admin" (dict "address" (include "consul-registrar-lib.adminAddress" .)) "drain" $c.manifest.drain "readiness" (toString (default "all" $c.manifest.readiness)) "services" $c.manifest.services }}
{{- if $consul }}{{ $_ := set $manifest "consul" $consul }}{{ end }}
{{- toYaml $manifest }}
{{- end }}

{{/*
The ConfigMap holding the manifest (nothing when config.manifest.existingConfigMap is set). Pass
"labels" in the dict to label it; with "onInstall" true, the pre-install/pre-upgrade hook copy the
`testPod` hook reads (see _test.tpl).
*/}}
{{- define "consul-registrar-lib.configMap" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- if not .resolved.manifest.existingConfigMap }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "consul-registrar-lib.manifestConfigMapName" . }}
  {{- with .labels }}
  labels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .onInstall }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
  {{- end }}
data:
  manifest.yaml: |
    # The consul-registrar manifest, generated from the chart's values.
    {{- include "consul-registrar-lib.manifest" . | nindent 4 }}
{{- end }}
{{- end }}

{{/*
The pod annotations: checksum/manifest (a changed manifest rolls the pods; an existing ConfigMap
has none: roll them yourself) and prometheus.io/* for the sidecar's /metrics. A YAML map, to be
placed under the pod template's metadata.annotations (merge your own over it).
*/}}
{{- define "consul-registrar-lib.podAnnotations" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $annotations := dict }}
{{- if not .resolved.manifest.existingConfigMap }}
{{- $_ := set $annotations "checksum/manifest" (include "consul-registrar-lib.manifest" . | sha256sum) }}
{{- end }}
{{- if .resolved.scrapeAnnotations }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" (toString (int .resolved.adminPort)) }}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
{{- end }}
{{- with $annotations }}{{ toYaml . }}{{ end }}
{{- end }}
