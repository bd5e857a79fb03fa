{{/*
One entry of workerGroupSpecs. Called with a dict:
  root          the chart's context (.)
  g             the group's values (workers' shape: groupName, gpus, resources, rayStartParams, env, labels, ...)
  component     app.kubernetes.io/component of its pods: worker | gateway
  replicas, min, max
  accel         a Ray accelerator type its replicas ask for, or ""
  rayResources  custom Ray resources each pod declares (name -> "amount"), or an empty dict
The gateway group also exposes directGrpc.port and is ready only once its gateway listens there.
*/}}
{{- define "elasticmoe.workerGroup" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .g }}
{{- $gateway := eq .component "gateway" }}
{{- $rayRes := deepCopy .rayResources }}
{{- with .accel }}{{- $_ := set $rayRes (printf "accelerator_type:%s" .) "1" }}{{- end }}
- groupName: {{ $g.groupName }}
  {{- if eq .component "worker" }}
  # At least the current cluster's size (see upgrade.startAtCurrentScale).
  {{- end }}
  replicas: {{ .replicas }}
  minReplicas: {{ .min }}
  maxReplicas: {{ .max }}
  {{- if $v.rayAutoscaler.enabled }}
  idleTimeoutSeconds: {{ $v.rayAutoscaler.idleTimeoutSeconds }}
  {{- end }}
  {{- with $rayRes }}
  # Declared to Ray on each pod of the group (KubeRay adds them to `ray start --resources`) and to the
  # autoscaler, which then knows this group serves replicas asking for them.
  resources:
    {{- range $k, $n := . }}
    {{ $k }}: {{ $n | quote }}
    {{- end }}
  {{- end }}
  rayStartParams:
    metrics-export-port: "8080"
    {{- range $k, $val := $g.rayStartParams }}
    {{ $k }}: {{ $val | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "elasticmoe.podSelectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
        {{- with $g.labels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      automountServiceAccountToken: false
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      # Time for Serve to drain a replica (and for shards to hand experts over).
      terminationGracePeriodSeconds: {{ $v.workers.terminationGracePeriodSeconds }}
      {{- with $g.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $g.affinity }}
      affinity:
        {{- toYaml $g.affinity | nindent 8 }}
      {{- else if $g.pack }}
      affinity:
        {{- include "elasticmoe.packAffinity" $root | nindent 8 }}
      {{- end }}
      {{- with $g.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "elasticmoe.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          resources:
            {{- $res := deepCopy $g.resources }}
            {{- if gt (int $g.gpus) 0 }}
            {{- $limits := default (dict) $res.limits }}
            {{- $_ := set $limits "nvidia.com/gpu" (int $g.gpus) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          ports:
            - name: metrics
              containerPort: 8080
            {{- if ne $v.serve.proxyLocation "HeadOnly" }}
            - name: serve
              containerPort: {{ $v.serve.httpPort }}
            - name: serve-grpc
              containerPort: {{ $v.serve.grpcPort }}
            {{- end }}
            {{- if $gateway }}
            - name: direct-grpc
              containerPort: {{ $v.directGrpc.port }}
            {{- end }}
          {{- $proxy := ne $v.serve.proxyLocation "HeadOnly" }}
          {{- if or $gateway (not $proxy) }}
          {{- $agent := get ($g.rayStartParams | default dict) "dashboard-agent-listen-port" | default 52365 }}
          # KubeRay's own readiness checks of a RayService worker, which a probe of ours replaces: its raylet (on the
          # group's dashboard agent port) and its Serve proxy (which decides whether <fullname>-serve-svc sends it
          # traffic; with HeadOnly none runs here, and KubeRay's probe, asking one on port 8000, would keep the pod
          # unready for good and its PodDisruptionBudget closed); on a gateway pod then the gateway's port: in
          # <fullname>-direct-grpc only while its gateway answers there.
          readinessProbe:
            exec:
              command:
                - bash
                - -c
                - >-
                  wget --tries 1 -T 2 -q -O- http://localhost:{{ int (toString $agent) }}/api/local_raylet_healthz | grep success
                  {{- if $proxy }}
                  && wget --tries 1 -T 2 -q -O- http://localhost:{{ $v.serve.httpPort }}/-/healthz | grep success
                  {{- end }}
                  {{- if $gateway }}
                  && : < /dev/tcp/127.0.0.1/{{ $v.directGrpc.port }}
                  {{- end }}
            timeoutSeconds: 5
            periodSeconds: 5
            failureThreshold: 2
          {{- end }}
          {{- if $g.preStopDrain }}
          lifecycle:
            {{- include "elasticmoe.preStop" $root | nindent 12 }}
          {{- end }}
          env:
            {{- include "elasticmoe.env" $root | nindent 12 }}
            {{- with $g.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          volumeMounts:
            {{- include "elasticmoe.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "elasticmoe.volumes" $root | nindent 8 }}
{{- end }}

{{/*
The custom Ray resource a gateway worker group's pods declare, one each, and each gateway replica asks for.
*/}}
{{- define "elasticmoe.gatewayResource" -}}
elasticmoe_gateway
{{- end }}
