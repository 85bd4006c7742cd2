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
