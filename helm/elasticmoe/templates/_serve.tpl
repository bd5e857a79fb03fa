{{/*
The Serve application: its config and args, the sizes they derive (deletion delay, worker replicas, shards)
and the model hash that decides between an in-place update and a new RayCluster.
*/}}

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
The shard count a new cluster starts at: `shards`, or more when the worker pods of the current scale hold more (one
GPU each, less the gateways' unless directGrpc gives them pods of their own). Only the controller's user_config
carries it (elasticmoe.deployments): a running controller ignores it, so an upgrade at another scale than the last
one's changes nothing on the cluster it keeps.
*/}}
{{- define "elasticmoe.numShards" -}}
{{- $v := .Values }}
{{- $n := int $v.shards }}
{{- $pods := int (include "elasticmoe.workerReplicas" .) }}
{{- if and $v.autoscaling.enabled (gt $pods (int $v.workers.replicas)) (gt (float64 $v.shardResources.numGpus) 0.0) }}
{{- $free := mulf (float64 $pods) (float64 $v.workers.gpus) }}
{{- if not $v.directGrpc.enabled }}{{- /* else the gateways run in gatewayGroup's pods */}}
{{- $free = subf $free (mulf (float64 $v.gateways) (float64 $v.gatewayResources.numGpus)) }}
{{- end }}
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
{{- if not (kindIs "invalid" $v.gatewayResources.memory) }}
  {{- $_ := set $gw "memory" (int64 $v.gatewayResources.memory) }}
{{- end }}
{{- with $v.gatewayResources.acceleratorType }}{{- $_ := set $gw "accelerator_type" . }}{{- end }}
{{- if $v.directGrpc.enabled }}
  {{- $_ := set $gw "resources" (dict (include "elasticmoe.gatewayResource" .) 1) }}
{{- end }}
{{- $sh := dict "num_cpus" $v.shardResources.numCpus "num_gpus" $v.shardResources.numGpus }}
{{- if not (kindIs "invalid" $v.shardResources.memory) }}
  {{- $_ := set $sh "memory" (int64 $v.shardResources.memory) }}
{{- end }}
{{- with $v.shardResources.acceleratorType }}{{- $_ := set $sh "accelerator_type" . }}{{- end }}
{{- $limits := dict
      "max_num_seqs" (int $v.limits.maxNumSeqs)
      "max_queue" (int $v.limits.maxQueue)
      "max_num_batched_tokens" (int $v.limits.maxNumBatchedTokens)
      "expert_timeout_s" $v.limits.expertTimeoutSeconds }}
{{- /* null: unset, so the app takes 2048 or the model's context where shorter (AppArgs' own default) */}}
{{- if not (kindIs "invalid" $v.limits.maxModelLen) }}
  {{- $_ := set $limits "max_model_len" (int $v.limits.maxModelLen) }}
{{- end }}
{{- /* limits.extra: the app's other limits, snake_case as in its `limits`, passed on as written (the app validates
       them at deploy, naming a field it does not know); one of the typed values above may not be set twice */}}
{{- $typed := dict "max_num_seqs" "maxNumSeqs" "max_model_len" "maxModelLen" "max_queue" "maxQueue"
      "max_num_batched_tokens" "maxNumBatchedTokens" "expert_timeout_s" "expertTimeoutSeconds" }}
{{- range $k, $x := $v.limits.extra | default dict }}
{{- if hasKey $typed $k }}
{{- fail (printf "limits.extra.%s duplicates limits.%s: set limits.%s and drop it from limits.extra"
            $k (get $typed $k) (get $typed $k)) }}
{{- end }}
{{- $_ := set $limits $k $x }}
{{- end }}
{{- $args := dict
      "model" $v.model.path
      "num_shards" (int $v.shards)
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
{{- if $v.directGrpc.enabled }}
  {{- $_ := set $args "direct_grpc" (dict "host" "0.0.0.0" "port" (int $v.directGrpc.port)) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- $a := $v.autoscaling }}
{{- /* The widest bounds: the operator's are the deployments' options (elasticmoe.deployments), which Serve applies
       in place; Serve hashes the args into the application's code version, and a change there replaces every
       replica */}}
{{- $as := dict
      "min_shards" 1
      "max_shards" 1024
      "target_utilization" $a.targetUtilization
      "rebalance_interval_s" $a.rebalanceIntervalSeconds
      "max_moves" (int $a.maxMoves)
      "scale_cooldown_s" $a.scaleCooldownSeconds }}
{{- if not (kindIs "invalid" $a.slotsPerShard) }}{{- $_ := set $as "slots_per_shard" (int $a.slotsPerShard) }}{{- end }}
{{- /* null (Helm drops the key): written as null, the app waits for good, not left out (its default: 600 s) */}}
{{- $_ := set $as "start_deadline_s" $a.startDeadlineSeconds }}
{{- $_ := set $args "autoscaling" $as }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
The application's deployment options with autoscaling (a list, as YAML; none without): the shard bounds as Serve's
autoscaling_config of the shards (app.shard_autoscaling: no initial_replicas, which Serve would reset the count to at
every change) and as the controller's user_config (config.ScaleConfig, with the count a new cluster starts at). Both
are options Serve applies to the running replicas: a change of them restarts none.
*/}}
{{- define "elasticmoe.deployments" -}}
{{- $a := .Values.autoscaling }}
{{- if $a.enabled }}
{{- $lo := int $a.minShards }}
{{- $hi := int $a.maxShards }}
{{- $policy := dict "policy_function" "elasticmoe.autoscaler.policy:shard_autoscaling_policy" }}
{{- $serve := dict "min_replicas" $lo "max_replicas" $hi "metrics_interval_s" 1.0 "look_back_period_s" 2.0
      "upscale_delay_s" 0.0 "downscale_delay_s" 0.0 "policy" $policy }}
{{- $scale := dict "min_shards" $lo "max_shards" $hi "start_shards" (int (include "elasticmoe.numShards" .)) }}
{{- toYaml (list (dict "name" "Controller" "user_config" $scale)
                 (dict "name" "ExpertShard" "autoscaling_config" $serve)) }}
{{- else }}
{{- toYaml list }}
{{- end }}
{{- end }}

{{/*
The Serve config (ServeDeploySchema shape, the same as deployments/*.yaml), as YAML.
*/}}
{{- define "elasticmoe.serveConfig" -}}
{{- $v := .Values }}
{{- $http := dict "host" "0.0.0.0" "port" (int $v.serve.httpPort) }}
{{- if not (kindIs "invalid" $v.serve.requestTimeoutSeconds) }}
  {{- $_ := set $http "request_timeout_s" $v.serve.requestTimeoutSeconds }}
{{- end }}
{{- $grpc := dict "port" (int $v.serve.grpcPort)
      "grpc_servicer_functions" (list "elasticmoe.rpc.serve_proxy.add_generation_servicer") }}
{{- if not (kindIs "invalid" $v.serve.requestTimeoutSeconds) }}
  {{- $_ := set $grpc "request_timeout_s" $v.serve.requestTimeoutSeconds }}
{{- end }}
{{- $app := dict
      "name" "elasticmoe"
      "route_prefix" "/"
      "import_path" "elasticmoe.app:build_app"
      "args" (include "elasticmoe.appArgs" . | fromYaml) }}
{{- with include "elasticmoe.deployments" . | fromYamlArray }}{{- $_ := set $app "deployments" . }}{{- end }}
{{- $cfg := dict
      "proxy_location" $v.serve.proxyLocation
      "http_options" $http
      "grpc_options" $grpc
      "logging_config" (dict "encoding" $v.serve.logEncoding "log_level" $v.serve.logLevel)
      "applications" (list $app) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The model's identity (path, revision, dtype, device): a change of it rolls out as a new RayCluster when
upgrade.newClusterOnModelChange; limits, replica counts and autoscaling stay in-place Serve updates.
*/}}
{{- define "elasticmoe.modelHash" -}}
{{- $m := .Values.model }}
{{- printf "%s@%s/%s/%s" $m.path (toString ($m.revision | default "")) $m.dtype $m.device | sha256sum }}
{{- end }}
