{{/*
Pieces of the Ray pods: environment, volumes and mounts, the head's download init container, the
workers' preStop drain and pack affinity.
*/}}

{{/*
Environment shared by the Ray containers of the head and the workers.
*/}}
{{- define "elasticmoe.env" -}}
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath | quote }}
{{- if .Values.modelCache.hfHubOffline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if eq .Values.rayAuth.mode "disabled" }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
# Serve's gRPC proxy refuses a larger message (RESOURCE_EXHAUSTED) before a gateway sees it.
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ int .Values.serve.grpcMaxMessageBytes | quote }}
# Serve's HTTP proxy refuses a body over 4 MiB (413), which it would otherwise read into memory
# whole before a gateway checks the API key (elasticmoe/rpc/serve_http_proxy.py).
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: elasticmoe.rpc.serve_http_proxy:middlewares
{{- with (.Values.limits.extra | default dict).max_body_bytes }}
- name: ELASTICMOE_PROXY_MAX_BODY_BYTES  # the proxies' cap follows the gateways' own
  value: {{ int64 . | quote }}
{{- end }}
# Expert shards serve gRPC on the pod IP (the gateways run in other pods), on a port of
# this range; the NetworkPolicy admits only the release's own pods to them.
- name: ELASTICMOE_EXPERT_HOST
  value: node_ip
- name: ELASTICMOE_EXPERT_PORT_RANGE
  value: "{{ int .Values.expertPort.start }}-{{ int .Values.expertPort.end }}"
# Triton's compiled kernels: a volume of the pod (or a shared cache PVC), not the home directory.
- name: TRITON_CACHE_DIR
  value: {{ .Values.tritonCache.mountPath | quote }}
# The root filesystem is read-only: caches live on an emptyDir.
- name: ELASTICMOE_CACHE
  value: /var/cache/elasticmoe
- name: XDG_CACHE_HOME
  value: /var/cache/elasticmoe/xdg
# CUDA's JIT cache (the driver's PTX compiled for this GPU), else ~/.nv on the read-only root: lost, and every
# process compiled again.
- name: CUDA_CACHE_PATH
  value: /var/cache/elasticmoe/cuda
{{- if .Values.internalTls.enabled }}
# mTLS between gateways, controller and expert shards: the release's CA bundle and certificate.
- name: ELASTICMOE_TLS_CA
  value: {{ printf "%s/ca.crt" .Values.internalTls.mountPath | quote }}
- name: ELASTICMOE_TLS_CERT
  value: {{ printf "%s/tls.crt" .Values.internalTls.mountPath | quote }}
- name: ELASTICMOE_TLS_KEY
  value: {{ printf "%s/tls.key" .Values.internalTls.mountPath | quote }}
{{- end }}
{{- with .Values.apiKeys.existingSecret }}
# API keys of the HTTP and gRPC APIs, one a line; re-read when the Secret changes.
- name: ELASTICMOE_API_KEYS_FILE
  value: {{ printf "/etc/elasticmoe/api-keys/%s" $.Values.apiKeys.key | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes and mounts shared by the head and the workers: model cache and /dev/shm.
*/}}
{{- define "elasticmoe.volumes" -}}
- name: model-cache
{{- $mc := .Values.modelCache }}
{{- /* the head's download init container writes the volume; the Ray containers still mount it read-only */}}
{{- $volRO := and $mc.readOnly (not .Values.model.download.enabled) }}
{{- if eq $mc.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "elasticmoe.fullname" . }}-models
    readOnly: {{ $volRO }}
{{- else if eq $mc.type "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ $mc.existingClaim }}
    readOnly: {{ $volRO }}
{{- else if eq $mc.type "hostPath" }}
  hostPath:
    path: {{ $mc.hostPath.path }}
    type: {{ $mc.hostPath.type }}
{{- else }}
  emptyDir:
    {{- with $mc.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
- name: triton-cache
{{- if .Values.tritonCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.tritonCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.tritonCache.sizeLimit }}
{{- end }}
# Ray's object store lives in shared memory; the container default (64 MiB) is too small.
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
# Writable places under the read-only root filesystem: /tmp (Ray's session, logs, spilled objects) and caches.
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.writable.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.writable.cacheSizeLimit }}
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  secret:
    secretName: {{ include "elasticmoe.tlsSecretName" . }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- with .Values.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ $.Values.apiKeys.key }}
        path: {{ $.Values.apiKeys.key }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "elasticmoe.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
  readOnly: {{ .Values.modelCache.readOnly }}
- name: triton-cache
  mountPath: {{ .Values.tritonCache.mountPath }}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/elasticmoe
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  mountPath: {{ .Values.internalTls.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  mountPath: /etc/elasticmoe/api-keys
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Head init container: `hf download --revision` of model.path into the model volume (the Hugging Face cache
under HF_HOME), before Ray starts. Files already there are skipped, so a head restart re-checks cheaply.
*/}}
{{- define "elasticmoe.downloadContainer" -}}
{{- $dl := .Values.model.download }}
- name: model-download
  image: {{ include "elasticmoe.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $dl.resources | nindent 4 }}
  command:
    - hf
    - download
    - {{ .Values.model.path | quote }}
    - --revision
    - {{ .Values.model.revision | toString | quote }}
    {{- range $dl.include }}
    - --include
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HF_HOME
      value: {{ .Values.modelCache.mountPath | quote }}
    {{- with $dl.hfTokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $dl.hfTokenSecret.key }}
    {{- end }}
  volumeMounts:
    - name: model-cache
      mountPath: {{ .Values.modelCache.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/*
Worker preStop: drain the Ray node (Serve stops routing to its proxy, starts its replicas elsewhere and lets
their requests finish), then wait until no Serve replica is left on it or the grace period is nearly over.
*/}}
{{- define "elasticmoe.preStop" -}}
{{- $deadline := sub (int .Values.workers.terminationGracePeriodSeconds) 10 | int -}}
preStop:
  exec:
    command:
      - /bin/bash
      - -c
      - >-
        ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "pod terminating"
        --deadline-remaining-seconds {{ $deadline }} || true;
        end=$((SECONDS + {{ $deadline }}));
        while [ $SECONDS -lt $end ] && grep -qs "ray::ServeReplica" /proc/[0-9]*/cmdline; do sleep 2; done
{{- end }}

{{/*
Pod affinity that packs a release's worker pods onto as few nodes (then zones) as fit: the gateway -> shard
fan-out stays on fast local links. workers.affinity, when set, replaces it.
*/}}
{{- define "elasticmoe.packAffinity" -}}
podAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "elasticmoe.podSelectorLabels" . | nindent 12 }}
            app.kubernetes.io/component: worker
    - weight: 50
      podAffinityTerm:
        topologyKey: topology.kubernetes.io/zone
        labelSelector:
          matchLabels:
            {{- include "elasticmoe.podSelectorLabels" . | nindent 12 }}
{{- end }}
