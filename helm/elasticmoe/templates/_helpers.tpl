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
Fail unless each of .ports (name, first, last, and optionally what then fails) lies outside Ray's worker ports on a
group's pods: `ray start`'s --min-worker-port 10002 / --max-worker-port 19999 (max 0: up to 65535; min 0: the OS
picks, unchecked) or its --worker-port-list, as the group's rayStartParams (.params of values key .key, group .name)
set them. A Ray worker may hold any of them, so a bind of elasticmoe's (or Serve's proxy's) there fails at random.
*/}}
{{- define "elasticmoe.clearOfWorkerPorts" -}}
{{- $p := .params | default dict }}
{{- $lo := 10002 }}{{- $hi := 19999 }}
{{- if hasKey $p "min-worker-port" }}{{- $lo = int (toString (get $p "min-worker-port")) }}{{- end }}
{{- if hasKey $p "max-worker-port" }}{{- $hi = int (toString (get $p "max-worker-port")) }}{{- end }}
{{- if eq $hi 0 }}{{- $hi = 65535 }}{{- end }}
{{- $set := or (hasKey $p "min-worker-port") (hasKey $p "max-worker-port") }}
{{- $where := printf "on the %s pods (%s%s.rayStartParams" .name ($set | ternary "" "ray start's default, moved by ") .key }}
{{- range $port := .ports }}
{{- $name := index $port 0 }}{{- $first := index $port 1 }}{{- $last := index $port 2 }}
{{- $shown := ($first | eq $last) | ternary (toString $first) (printf "%v-%v" $first $last) }}
{{- $then := printf "elasticmoe's bind there fails; move %s clear of them" $name }}
{{- if gt (len $port) 3 }}{{- $then = index $port 3 }}{{- end }}
{{- if hasKey $p "worker-port-list" }}
{{- range $w := splitList "," (toString (get $p "worker-port-list")) }}
{{- $n := int (trim $w) }}
{{- if and (ge $n $first) (le $n $last) }}
{{- fail (printf "%s %s overlaps Ray's worker port %v on the %s pods (%s.rayStartParams worker-port-list): a Ray worker may hold it and %s" $name $shown $n $.name $.key $then) }}
{{- end }}
{{- end }}
{{- else if and (gt $lo 0) (le $first $hi) (ge $last $lo) }}
{{- fail (printf "%s %s overlaps Ray's worker ports %v-%v %s min-worker-port / max-worker-port): a Ray worker may hold any of them and %s" $name $shown $lo $hi $where $then) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Semantic checks that values.schema.json cannot express. Each fails the render with a
message naming the values at fault.
*/}}
{{- define "elasticmoe.validate" -}}
{{- $v := .Values }}
{{- if gt (int $v.expertPort.start) (int $v.expertPort.end) }}
{{- fail (printf "expertPort.start (%v) must be <= expertPort.end (%v)" $v.expertPort.start $v.expertPort.end) }}
{{- end }}
{{- range $p := list (int $v.serve.httpPort) (int $v.serve.grpcPort) 6379 8080 8265 10001 52365 }}
{{- if and (ge $p (int $v.expertPort.start)) (le $p (int $v.expertPort.end)) }}
{{- fail (printf "expertPort range %v-%v overlaps port %v, which Ray or Serve uses" $v.expertPort.start $v.expertPort.end $p) }}
{{- end }}
{{- end }}
{{- /* every expert shard binds two ports of the range (its gRPC server and its frame listener, experts/server.py);
       a pod may run every shard (CPU), or as many as its GPUs hold */}}
{{- $perPod := int $v.shards }}
{{- if $v.autoscaling.enabled }}{{- $perPod = max $perPod (int $v.autoscaling.maxShards) }}{{- end }}
{{- if gt (float64 $v.shardResources.numGpus) 0.0 }}
{{- $perPod = min $perPod (int (floor (divf (float64 $v.workers.gpus) (float64 $v.shardResources.numGpus)))) }}
{{- end }}
{{- $span := add (sub (int $v.expertPort.end) (int $v.expertPort.start)) 1 }}
{{- if lt (int $span) (mul 2 $perPod | int) }}
{{- fail (printf "expertPort %v-%v holds %v ports, but each expert shard binds 2 (gRPC server, frame listener) and a worker pod may run %v shards: widen it to %v ports or more" $v.expertPort.start $v.expertPort.end $span $perPod (mul 2 $perPod)) }}
{{- end }}
{{- $groups := list (list "workers" $v.workers.groupName $v.workers.rayStartParams) }}
{{- if $v.directGrpc.enabled }}
{{- $groups = append $groups (list "gatewayGroup" $v.gatewayGroup.groupName $v.gatewayGroup.rayStartParams) }}
{{- end }}
{{- $groups = append $groups (list "head" "head" $v.head.rayStartParams) }}
{{- range $g := $groups }}
{{- $ports := list (list "expertPort" (int $v.expertPort.start) (int $v.expertPort.end)) }}
{{- if and $v.directGrpc.enabled (eq (index $g 0) "gatewayGroup") }}
{{- $ports = append $ports (list "directGrpc.port" (int $v.directGrpc.port) (int $v.directGrpc.port)) }}
{{- end }}
{{- /* Serve's proxies: on the head, and with EveryNode on the pods that run replicas */}}
{{- if or (eq (index $g 0) "head") (ne $v.serve.proxyLocation "HeadOnly") }}
{{- range $k := list "httpPort" "grpcPort" }}
{{- $sp := int (get $v.serve $k) }}
{{- $ports = append $ports (list (printf "serve.%s" $k) $sp $sp (printf "Serve's proxy fails to bind it; move serve.%s clear of them" $k)) }}
{{- end }}
{{- end }}
{{- /* Ray's own ports (ray start refuses to run when one lies among the worker ports): those of every pod, and
       the head's; a group's rayStartParams may move them */}}
{{- $p := index $g 2 | default dict }}
{{- /* keys the chart writes itself (a second one would be a duplicate YAML key; the metrics scrape and the
       operator's dashboard calls rely on these values) */}}
{{- $owned := ternary (list "metrics-export-port" "dashboard-host") (list "metrics-export-port") (eq (index $g 0) "head") }}
{{- range $k := $owned }}
{{- if hasKey $p $k }}
{{- fail (printf "%s.rayStartParams.%s is set by the chart (metrics-export-port 8080, the head's dashboard-host 0.0.0.0): remove it" (index $g 0) $k) }}
{{- end }}
{{- end }}
{{- $own := list (list "metrics export" "metrics-export-port" 8080) (list "dashboard agent" "dashboard-agent-listen-port" 52365) }}
{{- if eq (index $g 0) "head" }}
{{- $own = concat $own (list (list "GCS" "port" 6379) (list "dashboard" "dashboard-port" 8265) (list "client" "ray-client-server-port" 10001)) }}
{{- end }}
{{- range $r := $own }}
{{- $rp := int (toString (get $p (index $r 1) | default (index $r 2))) }}
{{- $ports = append $ports (list (printf "Ray's %s port" (index $r 0)) $rp $rp "`ray start` refuses to run with one of its own ports among them, so the pod never starts; move the worker ports clear of it") }}
{{- end }}
{{- include "elasticmoe.clearOfWorkerPorts" (dict "key" (index $g 0) "name" (index $g 1) "params" (index $g 2) "ports" $ports) }}
{{- end }}
{{- if eq (int $v.serve.httpPort) (int $v.serve.grpcPort) }}
{{- fail "serve.httpPort and serve.grpcPort must differ" }}
{{- end }}
{{- range $name := list "httpPort" "grpcPort" }}
{{- $p := int (get $v.serve $name) }}
{{- if has $p (list 6379 8080 8265 10001 52365) }}
{{- fail (printf "serve.%s %v is a port Ray uses on the pods (GCS 6379, metrics 8080, dashboard 8265, client 10001, dashboard agent 52365): Serve's proxy could not bind it" $name $p) }}
{{- end }}
{{- end }}
{{- range $p := $v.networkPolicy.operatorFrom }}
{{- if not (and $p.namespaceSelector $p.podSelector) }}
{{- fail "networkPolicy.operatorFrom: every peer needs a non-empty namespaceSelector AND a podSelector (a pod label alone can be set by anyone, in any namespace)" }}
{{- end }}
{{- end }}
{{- $tls := $v.internalTls }}
{{- if and $tls.enabled (eq $tls.source "existingSecret") (not $tls.existingSecret) }}
{{- fail "internalTls.source existingSecret needs internalTls.existingSecret (a Secret with ca.crt, tls.crt, tls.key)" }}
{{- end }}
{{- if and $tls.enabled (eq $tls.source "certManager") (not $tls.certManager.issuerRef.name) }}
{{- fail "internalTls.source certManager needs internalTls.certManager.issuerRef.name (a CA Issuer or ClusterIssuer)" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int $v.autoscaling.minShards) (int $v.autoscaling.maxShards) }}
{{- fail (printf "autoscaling.minShards (%v) must be <= autoscaling.maxShards (%v)" $v.autoscaling.minShards $v.autoscaling.maxShards) }}
{{- end }}
{{- if or (lt (int $v.shards) (int $v.autoscaling.minShards)) (gt (int $v.shards) (int $v.autoscaling.maxShards)) }}
{{- fail (printf "shards (%v) must lie within autoscaling.minShards..maxShards (%v..%v)" $v.shards $v.autoscaling.minShards $v.autoscaling.maxShards) }}
{{- end }}
{{- end }}
{{- $w := $v.workers }}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "workers: need minReplicas <= replicas <= maxReplicas (got %v, %v, %v)" $w.minReplicas $w.replicas $w.maxReplicas) }}
{{- end }}
{{- if and (eq $v.model.device "cuda") (eq (int $w.gpus) 0) }}
{{- fail "model.device is cuda but workers.gpus is 0: the worker pods would have no GPU" }}
{{- end }}
{{- if and (eq $v.model.device "cuda") (eq (float64 $v.shardResources.numGpus) 0.0) }}
{{- fail "model.device is cuda but shardResources.numGpus is 0: set it (usually 1: one shard per GPU)" }}
{{- end }}
{{- if and (eq $v.model.device "cuda") (eq (float64 $v.gatewayResources.numGpus) 0.0) }}
{{- fail "model.device is cuda but gatewayResources.numGpus is 0: the gateway runs attention on a GPU" }}
{{- end }}
{{- if gt (float64 $v.shardResources.numGpus) (float64 $w.gpus) }}
{{- fail (printf "shardResources.numGpus (%v) exceeds the GPUs of one worker pod (workers.gpus=%v)" $v.shardResources.numGpus $w.gpus) }}
{{- end }}
{{- if gt (float64 $v.gatewayResources.numGpus) (float64 $w.gpus) }}
{{- fail (printf "gatewayResources.numGpus (%v) exceeds the GPUs of one worker pod (workers.gpus=%v)" $v.gatewayResources.numGpus $w.gpus) }}
{{- end }}
{{- $pods := ternary $w.maxReplicas $w.replicas $v.rayAutoscaler.enabled }}
{{- $have := mulf (float64 $pods) (float64 $w.gpus) }}
{{- $need := addf (mulf (float64 $v.gateways) (float64 $v.gatewayResources.numGpus)) (mulf (float64 $v.shards) (float64 $v.shardResources.numGpus)) }}
{{- if gt $need $have }}
{{- fail (printf "the replicas need %v GPUs (gateways x gatewayResources.numGpus + shards x shardResources.numGpus) but the worker group has %v (%v pods x workers.gpus=%v)" $need $have $pods $w.gpus) }}
{{- end }}
{{- if and (eq $v.modelCache.type "existingClaim") (not $v.modelCache.existingClaim) }}
{{- fail "modelCache.type is existingClaim but modelCache.existingClaim names no PVC" }}
{{- end }}
{{- if and (eq $v.upgrade.strategy "NewClusterWithIncrementalUpgrade") (not $v.upgrade.clusterUpgradeOptions.gatewayClassName) }}
{{- fail "upgrade.strategy NewClusterWithIncrementalUpgrade needs upgrade.clusterUpgradeOptions.gatewayClassName (Gateway API)" }}
{{- end }}
{{- if and (eq $v.upgrade.strategy "NewClusterWithIncrementalUpgrade") (not $v.rayAutoscaler.enabled) }}
{{- fail "upgrade.strategy NewClusterWithIncrementalUpgrade needs rayAutoscaler.enabled (KubeRay: Ray Autoscaler is required)" }}
{{- end }}
{{- $delay := $v.rayService.rayClusterDeletionDelaySeconds }}
{{- if and (not (kindIs "invalid" $delay)) (lt (int $delay) (int (include "elasticmoe.deletionDelay" .))) }}
{{- fail (printf "rayService.rayClusterDeletionDelaySeconds (%v) must be >= serve.requestTimeoutSeconds + rayService.drainMarginSeconds (%v): the old cluster would be deleted under requests still streaming" $delay (include "elasticmoe.deletionDelay" .)) }}
{{- end }}
{{- with $v.rayService.initializingTimeout }}
{{- if not (regexMatch "^([1-9][0-9]*|([0-9]+(\\.[0-9]+)?(h|m|s|ms))+)$" (toString .)) }}
{{- fail (printf "rayService.initializingTimeout %q: a Go duration (e.g. 45m, 1h30m) or whole seconds" (toString .)) }}
{{- end }}
{{- end }}
{{- $dl := $v.model.download }}
{{- if $dl.enabled }}
{{- if not (regexMatch "^[A-Za-z0-9][-\\w.]*/[A-Za-z0-9][-\\w.]*$" $v.model.path) }}
{{- fail (printf "model.download.enabled needs model.path to be a hub id (org/name), got %q" $v.model.path) }}
{{- end }}
{{- if not $v.model.revision }}
{{- fail "model.download.enabled needs model.revision (a branch, tag or, best, a commit): the download and every replica use it" }}
{{- end }}
{{- if eq $v.modelCache.type "emptyDir" }}
{{- fail "model.download.enabled with modelCache.type emptyDir: the head would download into its own pod only; use pvc, existingClaim or hostPath" }}
{{- end }}
{{- end }}
{{- $ga := $v.gatewayResources.acceleratorType }}
{{- $sa := $v.shardResources.acceleratorType }}
{{- if and $ga $sa (ne $ga $sa) (not $v.directGrpc.enabled) }}
{{- fail (printf "gatewayResources.acceleratorType (%s) and shardResources.acceleratorType (%s) differ, but the chart has one worker group (directGrpc.enabled gives the gateways their own)" $ga $sa) }}
{{- end }}
{{- if $v.directGrpc.enabled }}
{{- $dp := int $v.directGrpc.port }}
{{- if has $dp (list (int $v.serve.httpPort) (int $v.serve.grpcPort) 6379 8080 8265 10001 52365) }}
{{- fail (printf "directGrpc.port %v is a port Serve or Ray uses" $dp) }}
{{- end }}
{{- if and (ge $dp (int $v.expertPort.start)) (le $dp (int $v.expertPort.end)) }}
{{- fail (printf "directGrpc.port %v lies in expertPort %v-%v" $dp $v.expertPort.start $v.expertPort.end) }}
{{- end }}
{{- if and (gt (float64 $v.gatewayResources.numGpus) 0.0) (lt (float64 $v.gatewayGroup.gpus) (float64 $v.gatewayResources.numGpus)) }}
{{- fail (printf "gatewayResources.numGpus is %v but gatewayGroup.gpus is %v: the gateway pods would have too few GPUs" $v.gatewayResources.numGpus $v.gatewayGroup.gpus) }}
{{- end }}
{{- range $k := list "num-cpus" "num-gpus" "memory" "resources" }}
{{- if hasKey $v.gatewayGroup.rayStartParams $k }}
{{- fail (printf "gatewayGroup.rayStartParams sets %s, which KubeRay refuses beside the group's own Ray resources" $k) }}
{{- end }}
{{- end }}
{{- if eq $v.gatewayGroup.groupName $v.workers.groupName }}
{{- fail "gatewayGroup.groupName and workers.groupName must differ" }}
{{- end }}
{{- end }}
{{- if and (or $ga $sa) (or (hasKey $v.workers.rayStartParams "num-cpus") (hasKey $v.workers.rayStartParams "num-gpus") (hasKey $v.workers.rayStartParams "memory") (hasKey $v.workers.rayStartParams "resources")) }}
{{- fail "workers.rayStartParams sets num-cpus / num-gpus / memory / resources, which KubeRay refuses beside the group resources an acceleratorType adds" }}
{{- end }}
{{- $ft := $v.gcsFaultTolerance }}
{{- if and $ft.enabled (not $ft.redisAddress) }}
{{- fail "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress (an external Redis, e.g. redis://redis.db.svc:6379)" }}
{{- end }}
{{- if and $v.workers.preStopDrain (not (kindIs "invalid" $v.serve.requestTimeoutSeconds)) (lt (int $v.workers.terminationGracePeriodSeconds) (add (int $v.serve.requestTimeoutSeconds) 30 | int)) }}
{{- fail (printf "workers.terminationGracePeriodSeconds (%v) must be >= serve.requestTimeoutSeconds + 30 (%v) so that the preStop drain lets streams finish" $v.workers.terminationGracePeriodSeconds (add (int $v.serve.requestTimeoutSeconds) 30)) }}
{{- end }}
{{- end }}

{{/*
Seconds KubeRay keeps the old RayCluster after switching traffic: the longest request plus a margin.
*/}}
{{- define "elasticmoe.deletionDelay" -}}
{{- $timeout := .Values.serve.requestTimeoutSeconds | default 600 }}
{{- add (int (ceil (float64 $timeout))) (int .Values.rayService.drainMarginSeconds) }}
{{- end }}

{{/*
Worker pods of a new RayCluster: at least the current cluster's (autoscaled) size, so that an upgrade does not
switch traffic to a smaller cluster. From upgrade.currentWorkerReplicas, or looked up in the cluster (helm
install/upgrade; `helm template` has no cluster and keeps workers.replicas).
*/}}
{{- define "elasticmoe.workerReplicas" -}}
{{- $v := .Values }}
{{- $cur := 0 }}
{{- if not (kindIs "invalid" $v.upgrade.currentWorkerReplicas) }}
{{- $cur = int $v.upgrade.currentWorkerReplicas }}
{{- else if $v.upgrade.startAtCurrentScale }}
{{- $rs := lookup "ray.io/v1" "RayService" .Release.Namespace (include "elasticmoe.fullname" .) }}
{{- $active := dig "status" "activeServiceStatus" "rayClusterName" "" ($rs | default dict) }}
{{- if $active }}
{{- $rc := lookup "ray.io/v1" "RayCluster" .Release.Namespace $active | default dict }}
{{- range $g := dig "spec" "workerGroupSpecs" list $rc }}
{{- if eq (toString $g.groupName) $v.workers.groupName }}{{- $cur = int (default 0 $g.replicas) }}{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- max (int $v.workers.replicas) (min $cur (int $v.workers.maxReplicas)) }}
{{- end }}

{{/*
Initial expert shards: `shards`, or more when the worker pods of the current scale hold more (one GPU each).
*/}}
{{- define "elasticmoe.numShards" -}}
{{- $v := .Values }}
{{- $n := int $v.shards }}
{{- $pods := int (include "elasticmoe.workerReplicas" .) }}
{{- if and $v.autoscaling.enabled (gt $pods (int $v.workers.replicas)) (gt (float64 $v.shardResources.numGpus) 0.0) }}
{{- $free := subf (mulf (float64 $pods) (float64 $v.workers.gpus)) (mulf (float64 $v.gateways) (float64 $v.gatewayResources.numGpus)) }}
{{- $fit := int (floor (divf $free (float64 $v.shardResources.numGpus))) }}
{{- $n = max $n (min $fit (int $v.autoscaling.maxShards)) }}
{{- end }}
{{- $n }}
{{- end }}

{{/*
The Serve application's args: exactly the fields of elasticmoe.config.AppArgs.
*/}}
{{- define "elasticmoe.appArgs" -}}
{{- $v := .Values }}
{{- $gw := dict "num_cpus" $v.gatewayResources.numCpus "num_gpus" $v.gatewayResources.numGpus }}
{{- if not (kindIs "invalid" $v.gatewayResources.memory) }}{{- $_ := set $gw "memory" (int64 $v.gatewayResources.memory) }}{{- end }}
{{- with $v.gatewayResources.acceleratorType }}{{- $_ := set $gw "accelerator_type" . }}{{- end }}
{{- if $v.directGrpc.enabled }}{{- $_ := set $gw "resources" (dict (include "elasticmoe.gatewayResource" .) 1) }}{{- end }}
{{- $sh := dict "num_cpus" $v.shardResources.numCpus "num_gpus" $v.shardResources.numGpus }}
{{- if not (kindIs "invalid" $v.shardResources.memory) }}{{- $_ := set $sh "memory" (int64 $v.shardResources.memory) }}{{- end }}
{{- with $v.shardResources.acceleratorType }}{{- $_ := set $sh "accelerator_type" . }}{{- end }}
{{- $limits := dict
      "max_num_seqs" (int $v.limits.maxNumSeqs)
      "max_model_len" (int $v.limits.maxModelLen)
      "max_queue" (int $v.limits.maxQueue)
      "max_num_batched_tokens" (int $v.limits.maxNumBatchedTokens)
      "expert_timeout_s" $v.limits.expertTimeoutSeconds }}
{{- $args := dict
      "model" $v.model.path
      "num_shards" (int (include "elasticmoe.numShards" .))
      "num_gateways" (int $v.gateways)
      "dtype" $v.model.dtype
      "device" $v.model.device
      "gateway_resources" $gw
      "shard_resources" $sh
      "limits" $limits
      "expert_metrics" $v.expertMetrics }}
{{- with $v.model.revision }}{{- $_ := set $args "revision" (toString .) }}{{- end }}
{{- with $v.model.servedName }}{{- $_ := set $args "served_model_name" (toString .) }}{{- end }}
{{- if not $v.internalTls.enabled }}{{- $_ := set $args "insecure_internal" true }}{{- end }}
{{- if $v.directGrpc.enabled }}{{- $_ := set $args "direct_grpc" (dict "host" "0.0.0.0" "port" (int $v.directGrpc.port)) }}{{- end }}
{{- if $v.autoscaling.enabled }}
{{- $a := $v.autoscaling }}
{{- $as := dict
      "min_shards" (int $a.minShards)
      "max_shards" (int $a.maxShards)
      "target_utilization" $a.targetUtilization
      "rebalance_interval_s" $a.rebalanceIntervalSeconds
      "max_moves" (int $a.maxMoves) }}
{{- if not (kindIs "invalid" $a.slotsPerShard) }}{{- $_ := set $as "slots_per_shard" (int $a.slotsPerShard) }}{{- end }}
{{- $_ := set $args "autoscaling" $as }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
The Serve config (ServeDeploySchema shape, the same as deployments/*.yaml), as YAML.
*/}}
{{- define "elasticmoe.serveConfig" -}}
{{- $v := .Values }}
{{- $http := dict "host" "0.0.0.0" "port" (int $v.serve.httpPort) }}
{{- if not (kindIs "invalid" $v.serve.requestTimeoutSeconds) }}{{- $_ := set $http "request_timeout_s" $v.serve.requestTimeoutSeconds }}{{- end }}
{{- $grpc := dict "port" (int $v.serve.grpcPort) "grpc_servicer_functions" (list "elasticmoe.rpc.serve_proxy.add_generation_servicer") }}
{{- if not (kindIs "invalid" $v.serve.requestTimeoutSeconds) }}{{- $_ := set $grpc "request_timeout_s" $v.serve.requestTimeoutSeconds }}{{- end }}
{{- $app := dict
      "name" "elasticmoe"
      "route_prefix" "/"
      "import_path" "elasticmoe.app:build_app"
      "args" (include "elasticmoe.appArgs" . | fromYaml) }}
{{- $cfg := dict
      "proxy_location" $v.serve.proxyLocation
      "http_options" $http
      "grpc_options" $grpc
      "logging_config" (dict "encoding" $v.serve.logEncoding "log_level" $v.serve.logLevel)
      "applications" (list $app) }}
{{- toYaml $cfg }}
{{- end }}

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
The model's identity (path, revision, dtype, device): a change of it rolls out as a new RayCluster when
upgrade.newClusterOnModelChange; limits, replica counts and autoscaling stay in-place Serve updates.
*/}}
{{- define "elasticmoe.modelHash" -}}
{{- $m := .Values.model }}
{{- printf "%s@%s/%s/%s" $m.path (toString ($m.revision | default "")) $m.dtype $m.device | sha256sum }}
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
