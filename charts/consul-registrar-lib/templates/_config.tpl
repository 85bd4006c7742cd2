{{/*
consul-registrar-lib: the configuration every template of this library reads.

Every public template takes one dict:

  (dict "config" .Values.consulRegistrar "context" $)

`config` is a map in the shape of `consul-registrar-lib.defaults` below (every key optional except
`manifest.services` or `manifest.existingConfigMap`); `context` is the calling chart's top-level
object (`$`). Values the user sets replace the defaults: maps are merged key by key, except
Kubernetes objects (probes, resources, security contexts) and lists, which are taken whole, so a
user's `readinessProbe.exec` never renders next to the default `httpGet`. An empty map or list
means "the default".
*/}}

{{- define "consul-registrar-lib.defaults" -}}
# Base name of the objects the library creates: <name>-registrar-manifest, <name>-registrar-drain-token.
# Default: the release name.
name: ""
# true: a native sidecar (an init container with restartPolicy: Always, Kubernetes 1.29+) that
# starts before the app and stops after it. false: a regular container next to the app.
native: true
image:
  repository: ghcr.io/consul-registrar/consul-registrar
  # Default: this library's appVersion. Must be a string ("1.10", not 1.10).
  tag: ""
  digest: ""
  pullPolicy: IfNotPresent
# The admin server (/metrics, /healthz, /readyz, /status, /drain); the kubelet's preStop GET goes
# to <pod IP>:adminPort, so it must not bind loopback.
adminPort: 9102
adminBindAddress: 0.0.0.0
logFormat: json
logLevel: info
extraEnv: []
resources:
  requests:
    cpu: 10m
    memory: 16Mi
  limits:
    memory: 64Mi
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop:
      - ALL
startupProbe:
  httpGet:
    path: /healthz
    port: registrar-admin
  periodSeconds: 1
  failureThreshold: 30
livenessProbe:
  httpGet:
    path: /healthz
    port: registrar-admin
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: registrar-admin
  periodSeconds: 2
  failureThreshold: 2
consul:
  # agent: register through the Consul client agent on the pod's node (/v1/agent/...).
  # catalog: register through the servers' catalog (/v1/catalog/...) on a virtual node per
  # Kubernetes node, with a Consul session per sidecar that reaps a crashed pod's instances; for
  # clusters without client agents. Needs `address` (the servers, e.g.
  # http://consul-server.consul.svc:8500).
  mode: agent
  # Default: the node-local client agent, http://$(HOST_IP):8500 (https://$(HOST_IP):8501 with TLS).
  # Required with mode catalog.
  address: ""
  # Catalog mode only (each empty: the sidecar's default).
  catalog:
    # The virtual node. Default: consul-registrar-$NODE_NAME (never a real agent's node name).
    node: ""
    # Its address. Default: $HOST_IP.
    nodeAddress: ""
    # The TTL of each sidecar's session (10s..24h); a crashed pod's instances are gone within
    # 2 x sessionTTL + 1 s while any catalog-mode sidecar is alive. Default: 10s.
    sessionTTL: ""
    # The KV prefix of the instances' liveness keys. Default: consul-registrar/instances.
    keyPrefix: ""
    # One Consul session per Kubernetes node: one sidecar renews it, the others heartbeat that
    # one on its admin port (pod to pod) instead of renewing sessions of their own. A sidecar that
    # cannot reach it keeps a session of its own. false: a session per sidecar.
    sharedSession: true
  datacenter: ""
  namespace: ""
  partition: ""
  aclToken:
    secretName: ""
    secretKey: token
  # Log in with a Consul auth method instead of holding a token (not with aclToken): the sidecar
  # logs in with a projected service account token of the pod and logs out after the drain
  # (docs/acl-login.md). The pod's service account must be named after its service for the
  # default binding rule (bind_type service, ${serviceaccount.name}); the library does not create
  # it: set the pod's serviceAccountName.
  login:
    # The auth method (a consul-k8s install's: <release>-k8s-auth-method). Empty: no login.
    authMethod: ""
    # The projected token's audience. Empty: the API server's own, which a kubernetes auth
    # method's TokenReview expects; a jwt auth method: one of its BoundAudiences.
    audience: ""
    # The projected token's lifetime; the kubelet rotates it at 80 %, and the sidecar logs in again.
    expirationSeconds: 3600
    # Meta on the login token, besides pod: <namespace>/<pod name>.
    meta: {}
    # Consul Enterprise: the auth method's namespace and partition. Empty: consul.namespace/partition.
    namespace: ""
    partition: ""
  tls:
    enabled: false
    caSecretName: ""
    caSecretKey: ca.crt
    clientSecretName: ""
    clientCertKey: tls.crt
    clientKeyKey: tls.key
    serverName: ""
    insecureSkipVerify: false
manifest:
  existingConfigMap: ""
  existingConfigMapKey: manifest.yaml
  drain:
    delay: 5s
    deregisterTimeout: 10s
  # What makes the pod Ready (/readyz, the sidecar's readinessProbe): all (every instance passing
  # in Consul), any (at least one), registered (every instance in Consul, whatever its status).
  readiness: all
  consul: {}
  services: []
drainToken:
  # The credential the app's preStop hook sends (X-Drain-Token) and the sidecar requires. Empty:
  # generated once (32 characters) and kept across upgrades by reading back the Secret the
  # library created (`lookup`; `helm template` cannot, so GitOps renders must set it).
  value: ""
# The pod's termination budget, checked against drain.delay + drain.deregisterTimeout +
# appShutdownSeconds. Render it with `consul-registrar-lib.terminationGracePeriodSeconds`.
terminationGracePeriodSeconds: 30
# Seconds the app needs to stop after SIGTERM.
appShutdownSeconds: 5
# prometheus.io/* pod annotations for the sidecar's /metrics.
scrapeAnnotations: true
{{- end }}

{{/* Keys whose user value (a Kubernetes object) replaces the default whole; lists always do. */}}
{{- define "consul-registrar-lib.replacedKeys" -}}
resources securityContext startupProbe livenessProbe readinessProbe
{{- end }}

{{/* Merges .src into .dst (mutating .dst), maps key by key except .replace keys. */}}
{{- define "consul-registrar-lib.mergeInto" -}}
{{- $dst := .dst }}
{{- $replace := .replace }}
{{- range $key, $value := .src }}
{{- $current := get $dst $key }}
{{- if kindIs "invalid" $value }}
{{- else if and (kindIs "map" $value) (kindIs "map" $current) (not (has $key $replace)) }}
{{- include "consul-registrar-lib.mergeInto" (dict "dst" $current "src" $value "replace" $replace) }}
{{- else if and (or (kindIs "map" $value) (kindIs "slice" $value)) (empty $value) }}
{{- /* {} or []: keep the default. */}}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Resolves the input dict once: sets .resolved to the config with defaults applied. Every public
template starts with it. Fails on values no template could render.
*/}}
{{- define "consul-registrar-lib.resolve" -}}
{{- if not (hasKey . "resolved") }}
{{- $ctx := required "consul-registrar-lib: call with (dict \"config\" <values> \"context\" $)" .context }}
{{- $c := fromYaml (include "consul-registrar-lib.defaults" .) }}
{{- $replace := splitList " " (include "consul-registrar-lib.replacedKeys" .) }}
{{- include "consul-registrar-lib.mergeInto" (dict "dst" $c "src" (deepCopy (default dict .config)) "replace" $replace) }}
{{- if not $c.name }}{{ $_ := set $c "name" $ctx.Release.Name }}{{ end }}
{{- if not (kindIs "string" $c.image.tag) }}
{{- fail (printf "consul-registrar image.tag must be a string: quote it (tag: \"%v\"), or YAML reads 1.10 as the number 1.1" $c.image.tag) }}
{{- end }}
{{- if and (not $c.manifest.existingConfigMap) (empty $c.manifest.services) }}
{{- fail "consul-registrar: set manifest.services (the services this pod registers) or manifest.existingConfigMap" }}
{{- end }}
{{- include "consul-registrar-lib.validateMode" $c }}
{{- $_ := set . "resolved" $c }}
{{- end }}
{{- end }}

{{/* The object names. */}}
{{- define "consul-registrar-lib.manifestConfigMapName" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved }}
{{- $suffix := ternary "-registrar-manifest-check" "-registrar-manifest" (.onInstall | default false) }}
{{- default (printf "%s%s" $c.name $suffix | trunc 63 | trimSuffix "-") $c.manifest.existingConfigMap }}
{{- end }}

{{- define "consul-registrar-lib.manifestKey" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- if .resolved.manifest.existingConfigMap }}{{ .resolved.manifest.existingConfigMapKey }}{{ else }}manifest.yaml{{ end }}
{{- end }}

{{- define "consul-registrar-lib.drainTokenSecretName" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- printf "%s-registrar-drain-token" .resolved.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The sidecar image: repository@digest, else repository:tag (tag defaulting to the library's appVersion). */}}
{{- define "consul-registrar-lib.image" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $image := .resolved.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default (include "consul-registrar-lib.appVersion" .) $image.tag) }}
{{- end }}
{{- end }}

{{/* The release of consul-registrar this library belongs to (kept equal to Chart.yaml's appVersion by the tests). */}}
{{- define "consul-registrar-lib.appVersion" -}}0.1.0{{- end }}

{{/* Where the sidecar finds its files. */}}
{{- define "consul-registrar-lib.manifestDir" -}}/etc/consul-registrar{{- end }}
{{- define "consul-registrar-lib.aclDir" -}}/var/run/secrets/consul-registrar/acl{{- end }}
{{- define "consul-registrar-lib.loginDir" -}}/var/run/secrets/consul-registrar/login{{- end }}
{{- define "consul-registrar-lib.caDir" -}}/var/run/secrets/consul-registrar/ca{{- end }}
{{- define "consul-registrar-lib.clientTlsDir" -}}/var/run/secrets/consul-registrar/client-tls{{- end }}

{{/* host:port for the admin server; IPv6 hosts get brackets. */}}
{{- define "consul-registrar-lib.adminAddress" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $host := .resolved.adminBindAddress | toString }}
{{- if has $host (list "127.0.0.1" "localhost" "::1") }}
{{- fail (printf "consul-registrar adminBindAddress %s is loopback: the kubelet sends the preStop GET to the pod IP" $host) }}
{{- end }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int .resolved.adminPort) }}
{{- else }}
{{- printf "%s:%d" $host (int .resolved.adminPort) }}
{{- end }}
{{- end }}

{{- define "consul-registrar-lib.consulAddress" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $consul := .resolved.consul }}
{{- if $consul.address }}
{{- $consul.address }}
{{- else if $consul.tls.enabled }}
{{- "https://$(HOST_IP):8501" }}
{{- else }}
{{- "http://$(HOST_IP):8500" }}
{{- end }}
{{- end }}

{{/* Seconds in a Go-style duration ("500ms", "5s", "1m30s"), rounded up. */}}
{{- define "consul-registrar-lib.durationSeconds" -}}
{{- include "consul-registrar-lib.durationExactSeconds" . | float64 | ceil | int }}
{{- end }}

{{/* Seconds in a Go-style duration, as a decimal number. */}}
{{- define "consul-registrar-lib.durationExactSeconds" -}}
{{- $text := toString . }}
{{- if not (regexMatch "^(0|([0-9]+(\\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h))+)$" $text) }}
{{- fail (printf "consul-registrar: %q is not a duration the chart can check (500ms, 5s, 1m30s; no ${VAR} in drain.delay or drain.deregisterTimeout)" $text) }}
{{- end }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h)" $text -1 }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . | float64 }}
{{- $unit := regexReplaceAll "^[0-9]+(\\.[0-9]+)?" . "" }}
{{- $scale := get (dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "μs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit }}
{{- $total = addf $total (mulf $number $scale) }}
{{- end }}
{{- $total }}
{{- end }}
