{{/*
Names. The RayService is named <fullname>; KubeRay derives <fullname>-head-svc and
<fullname>-serve-svc from it, so fullname stays short (40 chars: room for KubeRay's
suffixes within the 63-char limit on Service names and labels).
*/}}
{{- define "elasticmoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "elasticmoe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "elasticmoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of the chart's own objects (RayService, Services, NetworkPolicy, ...).
*/}}
{{- define "elasticmoe.labels" -}}
helm.sh/chart: {{ include "elasticmoe.chart" . }}
app.kubernetes.io/name: {{ include "elasticmoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: elasticmoe
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels that identify the release's Ray pods (head and workers, of every RayCluster the
RayService creates, including the new one during an upgrade). KubeRay sets and selects
app.kubernetes.io/name=kuberay and app.kubernetes.io/created-by on the pods itself, so
those two keys are never set here.
*/}}
{{- define "elasticmoe.podSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: elasticmoe
elasticmoe.io/release: {{ include "elasticmoe.fullname" . }}
{{- end }}

{{- define "elasticmoe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/*
The internal-TLS Secret the pods mount, and the accelerator type the worker group asks for.
*/}}
{{- define "elasticmoe.tlsSecretName" -}}
{{- if eq .Values.internalTls.source "existingSecret" }}
{{- .Values.internalTls.existingSecret }}
{{- else }}
{{- printf "%s-internal-tls" (include "elasticmoe.fullname" .) }}
{{- end }}
{{- end }}

{{- define "elasticmoe.acceleratorType" -}}
{{- .Values.shardResources.acceleratorType | default .Values.gatewayResources.acceleratorType | default "" }}
{{- end }}

{{/*
A port Ray binds on the head pod: head.rayStartParams[key] when set, else Ray's default. The container ports (KubeRay
builds the head Service and finds the dashboard from them), the NetworkPolicy and the checks all read it here.
Usage: include "elasticmoe.headPort" (list $ "dashboard-port" 8265)
*/}}
{{- define "elasticmoe.headPort" -}}
{{- $params := (index . 0).Values.head.rayStartParams | default dict -}}
{{- int (toString (get $params (index . 1) | default (index . 2))) -}}
{{- end }}
