/**
 * Strict typed declarations of the two non-core kinds in deploy/kubernetes/: the Prometheus
 * Operator's PodMonitor (monitoring.coreos.com/v1) and kustomize's Kustomization
 * (kustomize.config.k8s.io/v1beta1). Neither is in the Kubernetes API schema, so the manifest
 * test checks them against these. They list the fields of the upstream definitions that a
 * manifest here may use (a subset: anything else is reported as unknown, which is the point).
 */

interface LabelSelector {
  matchLabels?: Record<string, string>
  matchExpressions?: Array<{ key: string, operator: 'In' | 'NotIn' | 'Exists' | 'DoesNotExist', values?: string[] }>
}

interface ObjectMeta {
  name: string
  namespace?: string
  labels?: Record<string, string>
  annotations?: Record<string, string>
}

interface RelabelConfig {
  sourceLabels?: string[]
  separator?: string
  targetLabel?: string
  regex?: string
  modulus?: number
  replacement?: string
  action?: 'replace' | 'Replace' | 'keep' | 'Keep' | 'drop' | 'Drop' | 'hashmod' | 'HashMod' | 'labelmap' | 'LabelMap' | 'labeldrop' | 'LabelDrop' | 'labelkeep' | 'LabelKeep'
}

/** Prometheus duration as the operator's CRD accepts it: `15s`, `1m30s`. */
type Duration = `${number}${'ms' | 's' | 'm' | 'h'}${string}`

export interface PodMetricsEndpoint {
  port?: string
  portNumber?: number
  path?: string
  scheme?: 'http' | 'https'
  params?: Record<string, string[]>
  interval?: Duration
  scrapeTimeout?: Duration
  honorLabels?: boolean
  honorTimestamps?: boolean
  enableHttp2?: boolean
  followRedirects?: boolean
  filterRunning?: boolean
  relabelings?: RelabelConfig[]
  metricRelabelings?: RelabelConfig[]
}

export interface PodMonitor {
  apiVersion: 'monitoring.coreos.com/v1'
  kind: 'PodMonitor'
  metadata: ObjectMeta
  spec: {
    selector: LabelSelector
    podMetricsEndpoints: PodMetricsEndpoint[]
    namespaceSelector?: { any?: boolean, matchNames?: string[] }
    jobLabel?: string
    podTargetLabels?: string[]
    sampleLimit?: number
    targetLimit?: number
    labelLimit?: number
    attachMetadata?: { node?: boolean }
  }
}

interface GeneratorOptions {
  disableNameSuffixHash?: boolean
  immutable?: boolean
  labels?: Record<string, string>
  annotations?: Record<string, string>
}

interface ConfigMapGenerator {
  name: string
  namespace?: string
  behavior?: 'create' | 'replace' | 'merge'
  files?: string[]
  literals?: string[]
  envs?: string[]
  options?: GeneratorOptions
}

export interface Kustomization {
  apiVersion: 'kustomize.config.k8s.io/v1beta1'
  kind: 'Kustomization'
  namespace?: string
  namePrefix?: string
  nameSuffix?: string
  resources?: string[]
  components?: string[]
  configMapGenerator?: ConfigMapGenerator[]
  secretGenerator?: Array<ConfigMapGenerator & { type?: string }>
  generatorOptions?: GeneratorOptions
  images?: Array<{ name: string, newName?: string, newTag?: string, digest?: string }>
  labels?: Array<{ pairs: Record<string, string>, includeSelectors?: boolean, includeTemplates?: boolean }>
  commonAnnotations?: Record<string, string>
  replicas?: Array<{ name: string, count: number }>
  patches?: Array<{ path?: string, patch?: string, target?: Record<string, string> }>
}
