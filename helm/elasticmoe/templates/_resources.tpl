{{/*
The Ray resources of a group's pods as KubeRay gives them to `ray start`, and the check that one replica of the
gateways / shards fits a pod of the group that hosts it (elasticmoe.validate calls it).
*/}}

{{/*
A Kubernetes quantity (8Gi, 500m, 2, 1e9, 1.5G) as a float: cores or bytes.
*/}}
{{- define "elasticmoe.quantity" -}}
{{- $s := toString . }}
{{- $num := regexFind "^[0-9]*\\.?[0-9]*([eE][+-]?[0-9]+)?" $s }}
{{- $mult := get (dict "" 1.0 "n" 0.000000001 "u" 0.000001 "m" 0.001 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0
    "T" 1000000000000.0 "P" 1000000000000000.0 "E" 1000000000000000000.0 "Ki" 1024.0 "Mi" 1048576.0
    "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0)
    (trimPrefix $num $s) }}
{{- mulf (float64 $num) $mult }}
{{- end }}

{{/*
What Ray gets on one pod of a group (KubeRay's generateRayStartCommand): num-cpus from rayStartParams, else the
container's CPU limit, else its request, rounded up; memory from rayStartParams, else the memory limit. A key left
out: Ray sizes it itself (not checked). GPUs: the group's `gpus`, checked in elasticmoe.validate.
Called with (list <resources> <rayStartParams> <values key>); returns YAML {cpus, cpusFrom, memory, memoryFrom}.
*/}}
{{- define "elasticmoe.podRay" -}}
{{- $res := index . 0 | default dict }}{{- $params := index . 1 | default dict }}{{- $key := index . 2 }}
{{- $lim := $res.limits | default dict }}{{- $req := $res.requests | default dict }}
{{- $out := dict }}
{{- if hasKey $params "num-cpus" }}
{{- $_ := set $out "cpus" (float64 (toString (get $params "num-cpus"))) }}
{{- $_ := set $out "cpusFrom" (printf "%s.rayStartParams num-cpus" $key) }}
{{- else if and (hasKey $lim "cpu") (ne (include "elasticmoe.quantity" $lim.cpu) "0") }}
{{- $_ := set $out "cpus" (ceil (include "elasticmoe.quantity" $lim.cpu)) }}
{{- $_ := set $out "cpusFrom" (printf "%s.resources.limits.cpu %v" $key $lim.cpu) }}
{{- else if and (hasKey $req "cpu") (ne (include "elasticmoe.quantity" $req.cpu) "0") }}
{{- $_ := set $out "cpus" (ceil (include "elasticmoe.quantity" $req.cpu)) }}
{{- $_ := set $out "cpusFrom" (printf "%s.resources.requests.cpu %v, no limit" $key $req.cpu) }}
{{- end }}
{{- if hasKey $params "memory" }}
{{- $_ := set $out "memory" (float64 (toString (get $params "memory"))) }}
{{- $_ := set $out "memoryFrom" (printf "%s.rayStartParams memory" $key) }}
{{- else if and (hasKey $lim "memory") (ne (include "elasticmoe.quantity" $lim.memory) "0") }}
{{- $_ := set $out "memory" (ceil (include "elasticmoe.quantity" $lim.memory)) }}
{{- $_ := set $out "memoryFrom" (printf "%s.resources.limits.memory %v" $key $lim.memory) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Fail unless one replica (values key .rkey, e.g. gatewayResources) fits the CPUs and memory that one pod of the group
(values key .gkey) hosting it gives Ray: Ray would never place it, and the deploy would wait for good.
*/}}
{{- define "elasticmoe.replicaFits" -}}
{{- $r := .replica }}{{- $pod := .pod }}
{{- $then := printf "Ray would never place one, and the deploy would wait for good; raise %s.resources or lower %s"
    .gkey .rkey }}
{{- if and (hasKey $pod "cpus") (gt (float64 $r.numCpus) (float64 $pod.cpus)) }}
{{- fail (printf "%s.numCpus (%v) exceeds the CPUs one %s pod gives Ray (%v, from %s): %s.numCpus" .rkey
    $r.numCpus .gkey $pod.cpus $pod.cpusFrom $then) }}
{{- end }}
{{- if and (not (kindIs "invalid" $r.memory)) (hasKey $pod "memory") (gt (float64 $r.memory) (float64 $pod.memory)) }}
{{- fail (printf "%s.memory (%v bytes) exceeds the memory one %s pod gives Ray (%v bytes, from %s): %s.memory"
    .rkey (int64 $r.memory) .gkey (int64 $pod.memory) $pod.memoryFrom $then) }}
{{- end }}
{{- end }}

{{/*
Each replica type against the group that hosts it: the shards on the workers; the gateways on the workers, or with
directGrpc on the gateway group (only its pods declare the elasticmoe_gateway resource each gateway asks for).
*/}}
{{- define "elasticmoe.checkReplicasFit" -}}
{{- $v := .Values }}
{{- $workers := include "elasticmoe.podRay" (list $v.workers.resources $v.workers.rayStartParams "workers")
    | fromYaml }}
{{- include "elasticmoe.replicaFits" (dict "replica" $v.shardResources "rkey" "shardResources" "pod" $workers
    "gkey" "workers") }}
{{- if $v.directGrpc.enabled }}
{{- $gw := include "elasticmoe.podRay" (list $v.gatewayGroup.resources $v.gatewayGroup.rayStartParams
    "gatewayGroup") | fromYaml }}
{{- include "elasticmoe.replicaFits" (dict "replica" $v.gatewayResources "rkey" "gatewayResources" "pod" $gw
    "gkey" "gatewayGroup") }}
{{- else }}
{{- include "elasticmoe.replicaFits" (dict "replica" $v.gatewayResources "rkey" "gatewayResources" "pod" $workers
    "gkey" "workers") }}
{{- end }}
{{- end }}
