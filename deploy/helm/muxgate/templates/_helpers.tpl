{{/* The chart name, or nameOverride. */}}
{{- define "muxgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name: fullnameOverride, or RELEASE-NAME (RELEASE alone when it already contains the name). */}}
{{- define "muxgate.fullname" -}}
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

{{/* name-version, for the helm.sh/chart label. */}}
{{- define "muxgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The selector labels: stable across upgrades. */}}
{{- define "muxgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "muxgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard labels of every resource. */}}
{{- define "muxgate.labels" -}}
helm.sh/chart: {{ include "muxgate.chart" . }}
{{ include "muxgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: muxgate
{{- end }}

{{- define "muxgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "muxgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The port of a listen address ("0.0.0.0:8080", "[::]:8080"). */}}
{{- define "muxgate.port" -}}
{{- $port := regexFind "[0-9]+$" . }}
{{- if not $port }}
{{- fail (printf "cannot read a port from the listen address %q" .) }}
{{- end }}
{{- $port }}
{{- end }}

{{/* The client container port, from config.server.listen (default 0.0.0.0:8080). */}}
{{- define "muxgate.clientPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- include "muxgate.port" ($server.listen | default "0.0.0.0:8080") }}
{{- end }}

{{/* The admin container port, from config.server.admin_listen, which must not be loopback. */}}
{{- define "muxgate.adminPort" -}}
{{- $server := .Values.config.server | default dict }}
{{- $admin := $server.admin_listen | default "127.0.0.1:9090" }}
{{- if or (hasPrefix "127." $admin) (hasPrefix "localhost:" $admin) (hasPrefix "[::1]:" $admin) }}
{{- fail (printf "config.server.admin_listen is %q: in a pod it must listen on all addresses (0.0.0.0:9090) for the probes and the scrapes" $admin) }}
{{- end }}
{{- include "muxgate.port" $admin }}
{{- end }}

{{/*
Milliseconds of a humantime duration made of ms, s, m and h parts
("10s", "250ms", "2m", "1m 30s"); anything else fails the render.
*/}}
{{- define "muxgate.durationMillis" -}}
{{- $text := toString . | trim }}
{{- $total := 0 }}
{{- range $part := regexFindAll "[0-9]+ *(ms|h|m|s)" $text -1 }}
{{- $n := regexFind "^[0-9]+" $part | atoi }}
{{- $unit := regexFind "(ms|h|m|s)$" $part }}
{{- $scale := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit }}
{{- $total = add $total (mul $n $scale) }}
{{- end }}
{{- if ne (regexReplaceAll "[0-9]+ *(ms|h|m|s)| " $text "") "" }}
{{- fail (printf "cannot read the duration %q (the chart reads ms, s, m and h; set terminationGracePeriodSeconds by hand)" $text) }}
{{- end }}
{{- $total }}
{{- end }}

{{/* The preStop action actually used: sleep, exec or none. */}}
{{- define "muxgate.preStopAction" -}}
{{- $action := .Values.preStop.action | default "none" }}
{{- if eq $action "auto" }}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}sleep{{ else }}exec{{ end }}
{{- else if has $action (list "sleep" "exec" "none") }}
{{- $action }}
{{- else }}
{{- fail (printf "preStop.action is %q: one of sleep, exec, auto, none" $action) }}
{{- end }}
{{- end }}

{{/*
The least grace period: preStop + shutdown_grace (+ 5 s of handover with
reuse_port) + 5 s of margin, in whole seconds.
*/}}
{{- define "muxgate.minGraceSeconds" -}}
{{- $server := .Values.config.server | default dict }}
{{- $graceMs := include "muxgate.durationMillis" ($server.shutdown_grace | default "10s") | atoi }}
{{- $graceS := div (add $graceMs 999) 1000 }}
{{- $preStop := 0 }}
{{- if ne (include "muxgate.preStopAction" .) "none" }}
{{- $preStop = int .Values.preStop.seconds }}
{{- end }}
{{- $handover := ternary 5 0 (eq ($server.reuse_port | toString) "true") }}
{{- add $preStop $graceS $handover 5 }}
{{- end }}

{{/* terminationGracePeriodSeconds: the value, checked against the rule, or the rule's minimum when null. */}}
{{- define "muxgate.graceSeconds" -}}
{{- $min := include "muxgate.minGraceSeconds" . | atoi }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $min }}
{{- else }}
{{- $set := int .Values.terminationGracePeriodSeconds }}
{{- if lt $set $min }}
{{- fail (printf "terminationGracePeriodSeconds is %d, below preStop.seconds + config.server.shutdown_grace (+ 5 with reuse_port) + 5 = %d: SIGKILL would cut the drain" $set $min) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}
