{{/*
Values validation: elasticmoe.validate (the semantic checks values.schema.json cannot express) and its
worker-port check, elasticmoe.clearOfWorkerPorts. rayservice.yaml includes it first.
*/}}

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
{{- $where := printf "on the %s pods (%s%s.rayStartParams" .name ($set | ternary "" "ray start's default, moved by ")
    .key }}
{{- range $port := .ports }}
{{- $name := index $port 0 }}{{- $first := index $port 1 }}{{- $last := index $port 2 }}
{{- $shown := ($first | eq $last) | ternary (toString $first) (printf "%v-%v" $first $last) }}
{{- $then := printf "elasticmoe's bind there fails; move %s clear of them" $name }}
{{- if gt (len $port) 3 }}{{- $then = index $port 3 }}{{- end }}
{{- if hasKey $p "worker-port-list" }}
{{- range $w := splitList "," (toString (get $p "worker-port-list")) }}
{{- $n := int (trim $w) }}
{{- if and (ge $n $first) (le $n $last) }}
{{- fail (printf (print "%s %s overlaps Ray's worker port %v on the %s pods (%s.rayStartParams "
    "worker-port-list): a Ray worker may hold it and %s") $name $shown $n $.name $.key $then) }}
{{- end }}
{{- end }}
{{- else if and (gt $lo 0) (le $first $hi) (ge $last $lo) }}
{{- fail (printf (print "%s %s overlaps Ray's worker ports %v-%v %s min-worker-port / max-worker-port): a "
    "Ray worker may hold any of them and %s") $name $shown $lo $hi $where $then) }}
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
{{- $gcs := include "elasticmoe.headPort" (list $ "port" 6379) | int }}
{{- $dash := include "elasticmoe.headPort" (list $ "dashboard-port" 8265) | int }}
{{- $client := include "elasticmoe.headPort" (list $ "ray-client-server-port" 10001) | int }}
{{- $agent := include "elasticmoe.headPort" (list $ "dashboard-agent-listen-port" 52365) | int }}
{{- $rayPorts := list $gcs 8080 $dash $client $agent }}
{{- $rayNames := printf "GCS %v, metrics 8080, dashboard %v, client %v, dashboard agent %v" $gcs $dash $client $agent }}
{{- range $p := concat (list (int $v.serve.httpPort) (int $v.serve.grpcPort)) $rayPorts }}
{{- if and (ge $p (int $v.expertPort.start)) (le $p (int $v.expertPort.end)) }}
{{- fail (printf "expertPort range %v-%v overlaps port %v, which Ray or Serve uses" $v.expertPort.start
    $v.expertPort.end $p) }}
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
{{- fail (printf (print "expertPort %v-%v holds %v ports, but each expert shard binds 2 (gRPC server, frame "
    "listener) and a worker pod may run %v shards: widen it to %v ports or more") $v.expertPort.start $v.expertPort.end
    $span $perPod (mul 2 $perPod)) }}
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
{{- $ports = append $ports (list (printf "serve.%s" $k) $sp $sp
    (printf "Serve's proxy fails to bind it; move serve.%s clear of them" $k)) }}
{{- end }}
{{- end }}
{{- /* Ray's own ports (ray start refuses to run when one lies among the worker ports): those of every pod, and
       the head's; a group's rayStartParams may move them */}}
{{- $p := index $g 2 | default dict }}
{{- /* keys the chart writes itself (a second one would be a duplicate YAML key; the metrics scrape and the
       operator's dashboard calls rely on these values) */}}
{{- $owned := ternary (list "metrics-export-port" "dashboard-host") (list "metrics-export-port")
    (eq (index $g 0) "head") }}
{{- range $k := $owned }}
{{- if hasKey $p $k }}
{{- fail (printf (print "%s.rayStartParams.%s is set by the chart (metrics-export-port 8080, the head's "
    "dashboard-host 0.0.0.0): remove it") (index $g 0) $k) }}
{{- end }}
{{- end }}
{{- $own := list (list "metrics export" "metrics-export-port" 8080)
    (list "dashboard agent" "dashboard-agent-listen-port" 52365) }}
{{- if eq (index $g 0) "head" }}
{{- $own = concat $own (list (list "GCS" "port" 6379) (list "dashboard" "dashboard-port" 8265)
    (list "client" "ray-client-server-port" 10001)) }}
{{- end }}
{{- range $r := $own }}
{{- $rp := int (toString (get $p (index $r 1) | default (index $r 2))) }}
{{- $ports = append $ports (list (printf "Ray's %s port" (index $r 0)) $rp $rp
    (print "`ray start` refuses to run with one of its own ports among them, so the pod never "
    "starts; move the worker ports clear of it")) }}
{{- end }}
{{- include "elasticmoe.clearOfWorkerPorts" (dict "key" (index $g 0) "name" (index $g 1)
    "params" (index $g 2) "ports" $ports) }}
{{- end }}
{{- if and (eq $v.serve.proxyLocation "HeadOnly") $v.rayService.excludeHeadPodFromServeSvc }}
{{- fail (print "serve.proxyLocation HeadOnly with rayService.excludeHeadPodFromServeSvc: the head's is the only "
    "Serve proxy, and <fullname>-serve-svc would leave it out (no endpoint at all); drop one of them") }}
{{- end }}
{{- if eq (int $v.serve.httpPort) (int $v.serve.grpcPort) }}
{{- fail "serve.httpPort and serve.grpcPort must differ" }}
{{- end }}
{{- range $name := list "httpPort" "grpcPort" }}
{{- $p := int (get $v.serve $name) }}
{{- if has $p $rayPorts }}
{{- fail (printf "serve.%s %v is a port Ray uses on the pods (%s): Serve's proxy could not bind it" $name $p
    $rayNames) }}
{{- end }}
{{- end }}
{{- range $p := $v.networkPolicy.operatorFrom }}
{{- if not (and $p.namespaceSelector $p.podSelector) }}
{{- fail (print "networkPolicy.operatorFrom: every peer needs a non-empty namespaceSelector AND a "
    "podSelector (a pod label alone can be set by anyone, in any namespace)") }}
{{- end }}
{{- end }}
{{- if and $v.networkPolicy.enabled (ne $v.service.type "ClusterIP") (not $v.networkPolicy.servingFrom) }}
{{- fail (printf (print "service.type %s serves clients outside the cluster, but the NetworkPolicy admits the "
    "Serve ports from pods of the release namespace only (networkPolicy.servingFrom empty): nothing would get "
    "through; name the clients in networkPolicy.servingFrom (e.g. an ipBlock)") $v.service.type) }}
{{- end }}
{{- $tls := $v.internalTls }}
{{- if and $tls.enabled (eq $tls.source "existingSecret") (not $tls.existingSecret) }}
{{- fail (print "internalTls.source existingSecret needs internalTls.existingSecret (a Secret with "
    "ca.crt, tls.crt, tls.key)") }}
{{- end }}
{{- if and $tls.enabled (eq $tls.source "certManager") (not $tls.certManager.issuerRef.name) }}
{{- fail "internalTls.source certManager needs internalTls.certManager.issuerRef.name (a CA Issuer or ClusterIssuer)" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int $v.autoscaling.minShards) (int $v.autoscaling.maxShards) }}
{{- fail (printf "autoscaling.minShards (%v) must be <= autoscaling.maxShards (%v)" $v.autoscaling.minShards
    $v.autoscaling.maxShards) }}
{{- end }}
{{- if or (lt (int $v.shards) (int $v.autoscaling.minShards)) (gt (int $v.shards) (int $v.autoscaling.maxShards)) }}
{{- fail (printf "shards (%v) must lie within autoscaling.minShards..maxShards (%v..%v)" $v.shards
    $v.autoscaling.minShards $v.autoscaling.maxShards) }}
{{- end }}
{{- end }}
{{- $w := $v.workers }}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "workers: need minReplicas <= replicas <= maxReplicas (got %v, %v, %v)" $w.minReplicas $w.replicas
    $w.maxReplicas) }}
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
{{- fail (printf "shardResources.numGpus (%v) exceeds the GPUs of one worker pod (workers.gpus=%v)"
    $v.shardResources.numGpus $w.gpus) }}
{{- end }}
{{- /* with directGrpc the gateways have a group of their own (gatewayGroup.gpus is checked below) */}}
{{- $gwOnWorkers := not $v.directGrpc.enabled }}
{{- if and $gwOnWorkers (gt (float64 $v.gatewayResources.numGpus) (float64 $w.gpus)) }}
{{- fail (printf "gatewayResources.numGpus (%v) exceeds the GPUs of one worker pod (workers.gpus=%v)"
    $v.gatewayResources.numGpus $w.gpus) }}
{{- end }}
{{- $pods := ternary $w.maxReplicas $w.replicas $v.rayAutoscaler.enabled }}
{{- $have := mulf (float64 $pods) (float64 $w.gpus) }}
{{- $need := mulf (float64 $v.shards) (float64 $v.shardResources.numGpus) }}
{{- if $gwOnWorkers }}{{- $need = addf $need (mulf (float64 $v.gateways) (float64 $v.gatewayResources.numGpus)) }}
{{- end }}
{{- if gt $need $have }}
{{- fail (printf (print "the replicas need %v GPUs (%sshards x shardResources.numGpus) but the worker group has "
    "%v (%v pods x workers.gpus=%v)") $need ($gwOnWorkers | ternary "gateways x gatewayResources.numGpus + " "")
    $have $pods $w.gpus) }}
{{- end }}
{{- if and (eq $v.modelCache.type "existingClaim") (not $v.modelCache.existingClaim) }}
{{- fail "modelCache.type is existingClaim but modelCache.existingClaim names no PVC" }}
{{- end }}
{{- if and (eq $v.upgrade.strategy "NewClusterWithIncrementalUpgrade")
    (not $v.upgrade.clusterUpgradeOptions.gatewayClassName) }}
{{- fail (print "upgrade.strategy NewClusterWithIncrementalUpgrade needs "
    "upgrade.clusterUpgradeOptions.gatewayClassName (Gateway API)") }}
{{- end }}
{{- if and (eq $v.upgrade.strategy "NewClusterWithIncrementalUpgrade") (not $v.rayAutoscaler.enabled) }}
{{- fail (print "upgrade.strategy NewClusterWithIncrementalUpgrade needs rayAutoscaler.enabled "
    "(KubeRay: Ray Autoscaler is required)") }}
{{- end }}
{{- $delay := $v.rayService.rayClusterDeletionDelaySeconds }}
{{- if and (not (kindIs "invalid" $delay)) (lt (int $delay) (int (include "elasticmoe.deletionDelay" .))) }}
{{- fail (printf (print "rayService.rayClusterDeletionDelaySeconds (%v) must be >= "
    "serve.requestTimeoutSeconds + rayService.drainMarginSeconds (%v): the old cluster "
    "would be deleted under requests still streaming") $delay (include "elasticmoe.deletionDelay" .)) }}
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
{{- fail (print "model.download.enabled needs model.revision (a branch, tag or, best, a commit): the "
    "download and every replica use it") }}
{{- end }}
{{- if eq $v.modelCache.type "emptyDir" }}
{{- fail (print "model.download.enabled with modelCache.type emptyDir: the head would download into "
    "its own pod only; use pvc, existingClaim or hostPath") }}
{{- end }}
{{- end }}
{{- $ga := $v.gatewayResources.acceleratorType }}
{{- $sa := $v.shardResources.acceleratorType }}
{{- if and $ga $sa (ne $ga $sa) (not $v.directGrpc.enabled) }}
{{- fail (printf (print "gatewayResources.acceleratorType (%s) and shardResources.acceleratorType (%s) "
    "differ, but the chart has one worker group (directGrpc.enabled gives the gateways " "their own)") $ga $sa) }}
{{- end }}
{{- if $v.directGrpc.enabled }}
{{- $dp := int $v.directGrpc.port }}
{{- if has $dp (concat (list (int $v.serve.httpPort) (int $v.serve.grpcPort)) $rayPorts) }}
{{- fail (printf "directGrpc.port %v is a port Serve or Ray uses" $dp) }}
{{- end }}
{{- if and (ge $dp (int $v.expertPort.start)) (le $dp (int $v.expertPort.end)) }}
{{- fail (printf "directGrpc.port %v lies in expertPort %v-%v" $dp $v.expertPort.start $v.expertPort.end) }}
{{- end }}
{{- if and (gt (float64 $v.gatewayResources.numGpus) 0.0) (lt (float64 $v.gatewayGroup.gpus)
    (float64 $v.gatewayResources.numGpus)) }}
{{- fail (printf (print "gatewayResources.numGpus is %v but gatewayGroup.gpus is %v: the gateway pods would "
    "have too few GPUs") $v.gatewayResources.numGpus $v.gatewayGroup.gpus) }}
{{- end }}
{{- range $k := list "num-cpus" "num-gpus" "memory" "resources" }}
{{- if hasKey $v.gatewayGroup.rayStartParams $k }}
{{- fail (printf (print "gatewayGroup.rayStartParams sets %s, which KubeRay refuses beside the group's own "
    "Ray resources") $k) }}
{{- end }}
{{- end }}
{{- if eq $v.gatewayGroup.groupName $v.workers.groupName }}
{{- fail "gatewayGroup.groupName and workers.groupName must differ" }}
{{- end }}
{{- end }}
{{- if and (or $ga $sa) (or (hasKey $v.workers.rayStartParams "num-cpus") (hasKey $v.workers.rayStartParams "num-gpus")
    (hasKey $v.workers.rayStartParams "memory") (hasKey $v.workers.rayStartParams "resources")) }}
{{- fail (print "workers.rayStartParams sets num-cpus / num-gpus / memory / resources, which KubeRay "
    "refuses beside the group resources an acceleratorType adds") }}
{{- end }}
{{- /* labels the chart selects the release's pods and objects by, and those KubeRay sets on the pods itself */}}
{{- $own := list "app.kubernetes.io/instance" "app.kubernetes.io/part-of" "elasticmoe.io/release"
    "app.kubernetes.io/component" "app.kubernetes.io/name" "app.kubernetes.io/created-by" }}
{{- $sets := list (list "head.labels" $v.head.labels) (list "workers.labels" $v.workers.labels)
    (list "gatewayGroup.labels" $v.gatewayGroup.labels) (list "commonLabels" $v.commonLabels) }}
{{- range $l := $sets }}
{{- range $k, $_ := index $l 1 | default dict }}
{{- if or (has $k $own) (hasPrefix "ray.io/" $k) (hasPrefix "helm.sh/" $k)
    (and (eq (index $l 0) "commonLabels") (has $k (list "app.kubernetes.io/version" "app.kubernetes.io/managed-by"))) }}
{{- fail (printf (print "%s.%s: a label the chart or KubeRay sets itself (the release's Services, NetworkPolicy, "
    "PodDisruptionBudgets and ServiceMonitor, and KubeRay's own Services, select by them); use another key")
    (index $l 0) $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- $ft := $v.gcsFaultTolerance }}
{{- if and $ft.enabled (not $ft.redisAddress) }}
{{- fail (print "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress (an external Redis, "
    "e.g. redis://redis.db.svc:6379)") }}
{{- end }}
{{- if and $ft.enabled (contains "@" $ft.redisAddress) }}
{{- fail (print "gcsFaultTolerance.redisAddress holds credentials (user:password@): they would stand in plain text "
    "in the RayService and the head pod's env; give the address alone and the password as a Secret "
    "(gcsFaultTolerance.redisPasswordSecret)") }}
{{- end }}
{{- if and $v.workers.preStopDrain (not (kindIs "invalid" $v.serve.requestTimeoutSeconds))
    (lt (int $v.workers.terminationGracePeriodSeconds) (add (int $v.serve.requestTimeoutSeconds) 30 | int)) }}
{{- fail (printf (print "workers.terminationGracePeriodSeconds (%v) must be >= serve.requestTimeoutSeconds + "
    "30 (%v) so that the preStop drain lets streams finish") $v.workers.terminationGracePeriodSeconds
    (add (int $v.serve.requestTimeoutSeconds) 30)) }}
{{- end }}
{{- include "elasticmoe.checkReplicasFit" . }}
{{- end }}
