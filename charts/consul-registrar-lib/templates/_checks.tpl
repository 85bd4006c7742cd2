{{/*
Render-time checks. `consul-registrar-lib.terminationGracePeriodSeconds` renders the pod's
grace period (config.terminationGracePeriodSeconds) after checking that it covers the drain, and
refuses a native sidecar on a cluster older than 1.29; use it for the pod spec's
terminationGracePeriodSeconds so the number checked is the number rendered.
*/}}

{{/*
The shutdown budget: the app's preStop hook blocks for the drain delay and the deregistration
(bounded by drain.deregisterTimeout) before the app even gets SIGTERM, and the app then needs its
own shutdown time; the kubelet SIGKILLs when the grace period runs out.
*/}}
{{- define "consul-registrar-lib.validateGracePeriod" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $c := .resolved }}
{{- $delay := include "consul-registrar-lib.durationSeconds" $c.manifest.drain.delay | int }}
{{- $deregister := include "consul-registrar-lib.durationSeconds" (default "10s" $c.manifest.drain.deregisterTimeout) | int }}
{{- $shutdown := int $c.appShutdownSeconds }}
{{- $grace := int $c.terminationGracePeriodSeconds }}
{{- $needed := add $delay $deregister $shutdown }}
{{- if lt $grace $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least the drain delay (%s = %ds) plus drain.deregisterTimeout (%s = %ds) plus the app's own shutdown (%ds) = %ds: the app's preStop hook waits out the drain before the app gets SIGTERM, and the kubelet kills the pod when the grace period runs out. Raise terminationGracePeriodSeconds to %d, or shorten the drain." $grace (toString $c.manifest.drain.delay) $delay (toString (default "10s" $c.manifest.drain.deregisterTimeout)) $deregister $shutdown $needed $needed) }}
{{- end }}
{{- end }}

{{/* Native sidecars (init containers with restartPolicy: Always) exist from Kubernetes 1.29 on. */}}
{{- define "consul-registrar-lib.validateNativeSidecar" -}}
{{- include "consul-registrar-lib.resolve" . }}
{{- $version := .context.Capabilities.KubeVersion.Version }}
{{- if and .resolved.native (semverCompare "<1.29.0-0" $version) }}
{{- fail (printf "a native consul-registrar sidecar needs Kubernetes 1.29 or later (this is %s): set native=false (sidecar.native=false in the consul-registrar chart) to run it as a regular container" $version) }}
{{- end }}
{{- end }}

{{/*
consul.mode and its settings, as the sidecar checks them (a render that passes here is not refused
by the sidecar for these reasons): agent or catalog; consul.catalog.* only with catalog; the
agent-only check fields (ttl, deregisterCriticalServiceAfter) never with catalog; catalog mode
names the servers' address (the default, $(HOST_IP):8500, is a client agent); sessionTTL within
Consul's 10s..24h. Called by `resolve` with the merged config itself (not the dict).
*/}}
{{- define "consul-registrar-lib.validateMode" -}}
{{- $c := . }}
{{- $readiness := toString (default "all" $c.manifest.readiness) }}
{{- if not (has $readiness (list "all" "any" "registered")) }}
{{- fail (printf "consul-registrar: manifest.readiness must be all, any or registered, not %q (all: every instance passing in Consul; any: at least one; registered: every instance in Consul whatever its status)" $readiness) }}
{{- end }}
{{- $mode := toString $c.consul.mode }}
{{- if not (has $mode (list "agent" "catalog")) }}
{{- fail (printf "consul-registrar: consul.mode must be agent or catalog, not %q" $mode) }}
{{- end }}
{{- if and $c.consul.login.authMethod $c.consul.aclToken.secretName }}
{{- fail "consul-registrar: set consul.login.authMethod or consul.aclToken.secretName, not both: a login gets its own token from the auth method" }}
{{- end }}
{{- if and $c.consul.login.authMethod (lt (int (default 3600 $c.consul.login.expirationSeconds)) 600) }}
{{- fail "consul-registrar: consul.login.expirationSeconds must be at least 600 (Kubernetes' minimum for a projected service account token)" }}
{{- end }}
{{- range $key := list "mode" "catalog" "login" }}
{{- if hasKey (default dict $c.manifest.consul) $key }}
{{- fail (printf "consul-registrar: set consul.%s, not manifest.consul.%s (the library writes it into the manifest from consul.%s and checks it)" $key $key $key) }}
{{- end }}
{{- end }}
{{- $catalog := default dict $c.consul.catalog }}
{{- if eq $mode "agent" }}
{{- range $key := list "node" "nodeAddress" "sessionTTL" "keyPrefix" }}
{{- if get $catalog $key }}
{{- fail (printf "consul-registrar: consul.catalog.%s is only read in catalog mode, and consul.mode is agent: set consul.mode=catalog (registration through the servers' catalog) or remove consul.catalog.%s" $key $key) }}
{{- end }}
{{- end }}
{{- else }}
{{- if $c.manifest.existingConfigMap }}
{{- fail (printf "consul-registrar: consul.mode=catalog goes into the generated manifest, and manifest.existingConfigMap (%s) replaces it: put `mode: catalog` (and `catalog:`) in that ConfigMap's consul: section, keep consul.mode=agent here and set consul.address to the Consul servers" $c.manifest.existingConfigMap) }}
{{- end }}
{{- if not $c.consul.address }}
{{- fail "consul-registrar: consul.mode=catalog registers through the Consul servers: set consul.address to them, e.g. http://consul-server.consul.svc:8500 (the default, $(HOST_IP):8500, is a client agent on the node)" }}
{{- end }}
{{- range $i, $service := $c.manifest.services }}
{{- range $field := list "ttl" "deregisterCriticalServiceAfter" }}
{{- if and (kindIs "map" $service) (kindIs "map" $service.check) (hasKey $service.check $field) }}
{{- fail (printf "consul-registrar: manifest.services[%d].check.%s is agent-only and consul.mode is catalog: a catalog check has no TTL (the sidecar writes the probe's verdict into it), and a crashed pod's instance is reaped through its Consul session (consul.catalog.sessionTTL); remove check.%s" $i $field $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- with $catalog.sessionTTL }}
{{- $ttl := toString . }}
{{- if not (contains "${" $ttl) }}
{{- $seconds := include "consul-registrar-lib.durationExactSeconds" $ttl | float64 }}
{{- if or (lt $seconds 10.0) (gt $seconds 86400.0) }}
{{- fail (printf "consul-registrar: consul.catalog.sessionTTL %s is outside Consul's session TTL range, 10s..24h" $ttl) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Every check; renders nothing. */}}
{{- define "consul-registrar-lib.validate" -}}
{{- include "consul-registrar-lib.validateGracePeriod" . }}
{{- include "consul-registrar-lib.validateNativeSidecar" . }}
{{- end }}

{{/* The checked grace period, for the pod spec's terminationGracePeriodSeconds. */}}
{{- define "consul-registrar-lib.terminationGracePeriodSeconds" -}}
{{- include "consul-registrar-lib.validate" . }}
{{- int .resolved.terminationGracePeriodSeconds }}
{{- end }}
