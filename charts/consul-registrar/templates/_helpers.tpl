{{/*
Names, labels, the app container and the pod template. The sidecar, its preStop hook, volumes,
annotations and checks come from the library chart (charts/consul-registrar-lib), called with
the dict built by "consul-registrar.registrar": the same templates a team's own chart uses.
*/}}

{{/* The app's name: nameOverride, else the release name. It is app.kubernetes.io/name. */}}
{{- define "consul-registrar.name" -}}
{{- default .Release.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource names: fullnameOverride; else the release name, with nameOverride appended unless the release name contains it. */}}
{{- define "consul-registrar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if and .Values.nameOverride (not (contains .Values.nameOverride .Release.Name)) }}
{{- printf "%s-%s" .Release.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "consul-registrar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: the only chart labels on the pod template (with podLabels). */}}
{{- define "consul-registrar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consul-registrar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the objects (never of the pod template, so that a chart upgrade does not roll pods). */}}
{{- define "consul-registrar.labels" -}}
helm.sh/chart: {{ include "consul-registrar.chart" . }}
{{ include "consul-registrar.selectorLabels" . }}
{{- with .Values.app.image.tag }}
app.kubernetes.io/version: {{ . | trunc 63 | trimSuffix "-" | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the objects that serve the sidecar rather than the app (manifest, drain token, metrics, test). */}}
{{- define "consul-registrar.sidecarLabels" -}}
{{ include "consul-registrar.labels" . }}
app.kubernetes.io/component: consul-registrar
{{- end }}

{{- define "consul-registrar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- $default := include "consul-registrar.fullname" . }}
{{- if and .Values.consul.login.authMethod .Values.manifest.services }}
{{- /* Named after the service: a login's binding rule (bind_type service, ${serviceaccount.name}) lets the pod write it. */}}
{{- $default = (index .Values.manifest.services 0).name }}
{{- end }}
{{- default $default .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The app image: repository@digest or repository:tag; both repository and a tag (or digest) are required. */}}
{{- define "consul-registrar.appImage" -}}
{{- $image := .Values.app.image }}
{{- $repository := required "app.image.repository is required: the image of your application (see charts/consul-registrar/ci/ for examples)" $image.repository }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- if not (kindIs "string" $image.tag) }}
{{- fail (printf "app.image.tag must be a string: quote it (tag: \"%v\"), or YAML reads 1.10 as the number 1.1" $image.tag) }}
{{- end }}
{{- printf "%s:%s" $repository (required "app.image.tag (or app.image.digest) is required: the version of your application's image" $image.tag) }}
{{- end }}
{{- end }}

{{/*
The dict every library template takes: the sidecar's settings in the library's shape, built from
this chart's sidecar.*, consul.*, manifest.*, drainToken.* and app.shutdownSeconds.
*/}}
{{- define "consul-registrar.registrarConfig" -}}
{{- /* Use: $r := dict "config" (include "consul-registrar.registrarConfig" . | fromJson) "context" . */}}
{{- $config := deepCopy .Values.sidecar }}
{{- $_ := set $config "name" (include "consul-registrar.fullname" .) }}
{{- $_ := set $config "consul" .Values.consul }}
{{- $_ := set $config "manifest" .Values.manifest }}
{{- $_ := set $config "drainToken" .Values.drainToken }}
{{- $_ := set $config "terminationGracePeriodSeconds" .Values.terminationGracePeriodSeconds }}
{{- $_ := set $config "appShutdownSeconds" .Values.app.shutdownSeconds }}
{{- $_ := set $config "scrapeAnnotations" .Values.metrics.scrapeAnnotations }}
{{- toJson $config }}
{{- end }}

{{/* The app container's secure defaults; a user's app.securityContext replaces them. */}}
{{- define "consul-registrar.appSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* The pod's secure defaults (the images run as 65532:65532); a user's podSecurityContext replaces them. */}}
{{- define "consul-registrar.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The pod template: the app container plus the library's sidecar, hook, volumes and annotations. */}}
{{- define "consul-registrar.podTemplate" -}}
{{- $r := dict "config" (include "consul-registrar.registrarConfig" . | fromJson) "context" . -}}
metadata:
  labels:
    {{- include "consul-registrar.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := include "consul-registrar-lib.podAnnotations" $r | fromYaml | default dict }}
  {{- $annotations = merge (deepCopy .Values.podAnnotations) $annotations }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "consul-registrar.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
  terminationGracePeriodSeconds: {{ include "consul-registrar-lib.terminationGracePeriodSeconds" $r }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- if .Values.podSecurityContext }}
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
    {{- else }}
    {{- include "consul-registrar.podSecurityContext" . | nindent 4 }}
    {{- end }}
  {{- with include "consul-registrar-lib.initContainers" $r }}
  initContainers:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .Values.app.name }}
      image: {{ include "consul-registrar.appImage" . | quote }}
      imagePullPolicy: {{ .Values.app.image.pullPolicy }}
      {{- with .Values.app.command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if .Values.app.drainOnStop }}
      lifecycle:
        {{- include "consul-registrar-lib.preStop" $r | nindent 8 }}
      {{- end }}
      {{- with .Values.app.startupProbe }}
      startupProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.app.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- if .Values.app.securityContext }}
        {{- toYaml .Values.app.securityContext | nindent 8 }}
        {{- else }}
        {{- include "consul-registrar.appSecurityContext" . | nindent 8 }}
        {{- end }}
      {{- with .Values.app.volumeMounts }}
      volumeMounts:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- with include "consul-registrar-lib.containers" $r }}
    {{- . | nindent 4 }}
    {{- end }}
  volumes:
    {{- include "consul-registrar-lib.volumes" $r | nindent 4 }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
