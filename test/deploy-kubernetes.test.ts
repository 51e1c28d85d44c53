/**
 * deploy/kubernetes/: every manifest (and every ConfigMap the kustomization generates) passes
 * the Kubernetes API schema strictly — a misspelled field fails, and a test proves it — and
 * the pieces agree with each other and with Breakwater's config: the native-sidecar pod, its
 * probes on the ops port, the grace period above the drain, the Service on the proxy port,
 * the PodMonitor on /metrics, the admin token from a Secret, a read-only root with stateDir
 * on an emptyDir, and a config that `breakwater validate` accepts.
 */
import t from 'tap'
import { copyFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { basename, dirname, join, posix } from 'node:path'
import { parseAllDocuments, parse, stringify } from 'yaml'
import { ROOT } from './helpers/root.js'
import { schemaProblems, type Manifest } from './helpers/manifests.js'
import { runCli, tempDir, nodeFlagsOf } from './helpers/process.js'
import { loadConfigFile } from '../src/config/load.js'
import { AUDIT_FILES, AUDIT_MAX_BYTES } from '../src/state/audit-log.js'
import { Deployment, type IDeployment } from 'kubernetes-models/apps/v1/Deployment'
import type { IService } from 'kubernetes-models/v1/Service'
import type { IIoK8sApiCoreV1Container as Container, IIoK8sApiCoreV1Probe as Probe } from 'kubernetes-models/v1'
import type { Kustomization, PodMonitor } from './helpers/custom-resources.js'

const DIR = join(ROOT, 'deploy', 'kubernetes')

const kustomization = parse(readFileSync(join(DIR, 'kustomization.yaml'), 'utf8')) as Kustomization

function documents (file: string): Manifest[] {
  return parseAllDocuments(readFileSync(join(DIR, file), 'utf8'))
    .map((doc, i) => ({ source: `${file}#${i}`, object: doc.toJS() as unknown }))
    .filter((m) => m.object !== null)
}

/** The ConfigMaps kustomize builds from configMapGenerator (names before the hash suffix). */
function generatedConfigMaps (): Manifest[] {
  return (kustomization.configMapGenerator ?? []).map((g) => ({
    source: `kustomization.yaml configMapGenerator ${g.name}`,
    object: {
      apiVersion: 'v1',
      kind: 'ConfigMap',
      metadata: { name: g.name },
      data: Object.fromEntries((g.files ?? []).map((f) => [basename(f), readFileSync(join(DIR, f), 'utf8')]))
    }
  }))
}

const resources = (kustomization.resources ?? []).flatMap(documents)
const all: Manifest[] = [...documents('kustomization.yaml'), ...resources, ...generatedConfigMaps()]
const ofKind = <T>(kind: string): T[] => resources.map((m) => m.object as { kind?: string }).filter((o) => o.kind === kind) as T[]

const deployment = ofKind<IDeployment>('Deployment')[0] as IDeployment
const service = ofKind<IService>('Service')[0] as IService
const podMonitor = ofKind<PodMonitor>('PodMonitor')[0] as PodMonitor
const pod = deployment?.spec?.template
const podSpec = pod?.spec
const sidecar = podSpec?.initContainers?.find((c) => c.name === 'breakwater')
const app = podSpec?.containers[0]
const configPath = join(DIR, 'breakwater.yaml')
const { config } = await loadConfigFile(configPath, {})

t.test('every manifest and generated ConfigMap passes the Kubernetes API schema strictly', async (t) => {
  t.ok(deployment !== undefined && service !== undefined && podMonitor !== undefined, 'a Deployment, a Service and a PodMonitor')
  t.equal(all.filter((m) => (m.object as { kind?: string }).kind === 'ConfigMap').length, 2, 'two generated ConfigMaps (config and flags)')
  t.same(schemaProblems(all), [], `${all.length} objects, no problem`)
})

t.test('the schema check reports misspelled fields and wrong types', async (t) => {
  const copy = <T>(o: T): T => structuredClone(o)

  const probe = copy(deployment) as any
  const c = probe.spec.template.spec.initContainers[0]
  c.readynessProbe = c.readinessProbe
  delete c.readinessProbe
  c.ports[0].containerport = c.ports[0].containerPort
  delete c.ports[0].containerPort
  const problems = schemaProblems([{ source: 'copy', object: probe }])
  t.match(problems.join('\n'), /copy at spec\.template\.spec\.initContainers\[0\]\.readynessProbe: unknown field "readynessProbe"/, 'readynessProbe is reported with its path')
  t.match(problems.join('\n'), /must have required property containerPort/, 'and the required field it replaced is missing')
  t.match(problems.join('\n'), /copy at spec\.template\.spec\.initContainers\[0\]\.ports\[0\]\.containerport: unknown field "containerport"/, 'containerport is reported with its path')

  // The classic one: the API schema validator alone lets it through (the field is silently
  // dropped by the API server, and the root filesystem stays writable).
  const subtle = copy(deployment) as any
  const sc = subtle.spec.template.spec.initContainers[0].securityContext
  sc.readOnlyRootFileSystem = sc.readOnlyRootFilesystem
  delete sc.readOnlyRootFilesystem
  t.doesNotThrow(() => { new Deployment(subtle).validate() }, 'validate() alone accepts readOnlyRootFileSystem')
  t.match(schemaProblems([{ source: 'copy', object: subtle }]), [/copy at spec\.template\.spec\.initContainers\[0\]\.securityContext\.readOnlyRootFileSystem: unknown field/], 'the strict check reports it, and only it')

  const typed = copy(deployment) as any
  typed.spec.replicas = 'two'
  typed.spec.template.spec.initContainers[0].ports[1].protocol = 'HTTP'
  const typeErrors = schemaProblems([{ source: 'copy', object: typed }]).join('\n')
  t.match(typeErrors, /replicas must be integer/, 'a wrong type is reported (API schema validator)')
  t.match(typeErrors, /protocol must be equal to one of the allowed values/, 'a value outside an enum is reported')

  const service2 = copy(service) as any
  service2.spec.ports[0].targetport = service2.spec.ports[0].targetPort
  t.match(schemaProblems([{ source: 'svc', object: service2 }]).join('\n'), /svc at spec\.ports\[0\]\.targetport:/, 'a Service field')

  const monitor = copy(podMonitor) as any
  monitor.spec.podMetricEndpoints = monitor.spec.podMetricsEndpoints
  delete monitor.spec.podMetricsEndpoints
  const monitorProblems = schemaProblems([{ source: 'pm', object: monitor }]).join('\n')
  t.match(monitorProblems, /pm at spec\.podMetricEndpoints: unknown field/, 'a PodMonitor field')
  t.match(monitorProblems, /podMetricsEndpoints/, 'and the required field it replaced is missing')

  const interval = copy(podMonitor) as any
  interval.spec.podMetricsEndpoints[0].interval = 'often'
  t.match(schemaProblems([{ source: 'pm', object: interval }]).join('\n'), /pm at spec\.podMetricsEndpoints\[0\]\.interval:/, 'a PodMonitor value that is no duration')

  const kust = copy(kustomization) as any
  kust.resource = kust.resources
  delete kust.resources
  t.match(schemaProblems([{ source: 'k', object: kust }]).join('\n'), /k at resource: unknown field "resource": Kustomization has no such field/, 'a Kustomization field')

  t.match(schemaProblems([{ source: 'x', object: { apiVersion: 'v1', kind: 'Pod' } }]), [/x: no schema for v1 Pod/], 'a kind without a schema is a problem, not a pass')
})

t.test('kustomization.yaml names every manifest and file of the folder', async (t) => {
  const generated = (kustomization.configMapGenerator ?? []).flatMap((g) => g.files ?? [])
  for (const f of [...(kustomization.resources ?? []), ...generated]) t.ok(existsSync(join(DIR, f)), `${f} exists`)
  const listed = new Set(['kustomization.yaml', ...(kustomization.resources ?? []), ...generated])
  const unlisted = readdirSync(DIR).filter((f) => !listed.has(f))
  t.same(unlisted, [], 'no file in deploy/kubernetes/ is left out')
  t.ok(kustomization.images?.some((i) => i.name === sidecar?.image), 'the sidecar image is set through images:')
})

const byName = (containers: Container[] | undefined, name: string): Container | undefined => containers?.find((c) => c.name === name)
const portNumber = (c: Container | undefined, name: unknown): number | undefined => c?.ports?.find((p) => p.name === name)?.containerPort
const volume = (name: string) => podSpec?.volumes?.find((v) => v.name === name)

t.test('Breakwater is a native sidecar of the app, with its probes on the ops port', async (t) => {
  t.ok(sidecar, 'an init container named breakwater')
  if (sidecar === undefined) return
  t.equal(sidecar.restartPolicy, 'Always', 'restartPolicy: Always (native sidecar)')
  t.equal(podSpec?.initContainers?.[0]?.name, 'breakwater', 'it is the first init container, so it starts before anything else')
  t.ok(app !== undefined && app.name !== 'breakwater', 'beside an app container')

  t.equal(portNumber(sidecar, 'proxy'), config.listen.proxy.port, 'the proxy port is the config\'s listen.proxy.port')
  t.equal(portNumber(sidecar, 'ops'), config.listen.ops.port, 'the ops port is the config\'s listen.ops.port')
  t.equal(config.listen.ops.port, 14020, 'ops on 14020')
  t.equal(config.listen.admin.host, '127.0.0.1', 'the admin API stays on loopback')
  t.notOk(sidecar.ports?.some((p) => p.containerPort === config.listen.admin.port), 'the admin port is not declared on the pod')

  const probeOn = (probe: Probe | undefined, path: string, label: string): void => {
    t.equal(probe?.httpGet?.path, path, `${label} GETs ${path}`)
    t.equal(portNumber(sidecar, probe?.httpGet?.port), config.listen.ops.port, `${label} uses the ops port`)
  }
  probeOn(sidecar.startupProbe, '/live', 'startupProbe')
  probeOn(sidecar.readinessProbe, '/ready', 'readinessProbe')
  probeOn(sidecar.livenessProbe, '/live', 'livenessProbe')
  const startup = sidecar.startupProbe
  t.ok((startup?.periodSeconds ?? 10) * (startup?.failureThreshold ?? 3) >= 10, 'the startup probe allows at least 10 s to start')

  const command = [...(sidecar.command ?? []), ...(sidecar.args ?? [])]
  const configArg = command[command.indexOf('--config') + 1] ?? ''
  const configMount = sidecar.volumeMounts?.find((m) => configArg.startsWith(`${m.mountPath}/`))
  t.ok(configMount, `the --config path ${configArg} is on a mounted volume`)
  t.equal(volume(configMount?.name ?? '')?.configMap?.name, 'breakwater-config', 'from the generated config ConfigMap')
  t.equal(posix.basename(configArg), 'breakwater.yaml', 'the ConfigMap key is the file name')
  // `command` replaces the image's CMD, Node flags included: the pod must keep the image's fixed
  // young generation, or under its 256 MiB limit Node 24 would give V8 a 4 MiB one.
  t.ok(nodeFlagsOf(command).some((a) => /^--max-semi-space-size=\d+$/.test(a)), `the sidecar's command sets --max-semi-space-size as the image's CMD does (${command.join(' ')})`)

  const flagDir = dirname(config.flagSource?.path ?? '')
  const flagMount = sidecar.volumeMounts?.find((m) => m.mountPath === flagDir)
  t.ok(flagMount, `the flag file's folder ${flagDir} is a mount`)
  t.equal(flagMount?.subPath, undefined, 'mounted as a folder, not with subPath (subPath never sees ConfigMap updates)')
  t.equal(volume(flagMount?.name ?? '')?.configMap?.name, 'breakwater-flags', 'from the flags ConfigMap')
  const flagsGenerator = kustomization.configMapGenerator?.find((g) => g.name === 'breakwater-flags')
  t.equal(flagsGenerator?.options?.disableNameSuffixHash, true, 'the flags ConfigMap keeps a stable name, so editing it reloads instead of rolling out')
  t.ok(flagsGenerator?.files?.includes(posix.basename(config.flagSource?.path ?? '')), 'and holds the file flagSource reads')
})

t.test('the app gets traffic only through Breakwater; Prometheus scrapes it', async (t) => {
  const labels = pod?.metadata?.labels ?? {}
  const matches = (selector: Record<string, string> | undefined): boolean =>
    selector !== undefined && Object.keys(selector).length > 0 && Object.entries(selector).every(([k, v]) => labels[k] === v)
  t.ok(matches(deployment.spec?.selector.matchLabels), 'the Deployment selects its own pods')
  t.ok(matches(service.spec?.selector), 'the Service selects the pods')
  const target = service.spec?.ports?.[0]?.targetPort
  // By number: a named targetPort finds only regular containers' ports before Kubernetes 1.32
  // (kubernetes/kubernetes#127958), and the proxy port is the native sidecar's, an init container's.
  t.type(target, 'number', `the Service's targetPort is a number, not a port name (got ${JSON.stringify(target)})`)
  t.equal(target, config.listen.proxy.port, `the Service targets the config's proxy port (${String(target)})`)
  t.equal(portNumber(sidecar, 'proxy'), target, 'which the sidecar declares as its proxy port')
  t.ok(matches(podMonitor.spec.selector.matchLabels), 'the PodMonitor selects the pods')
  const endpoint = podMonitor.spec.podMetricsEndpoints[0]
  t.equal(portNumber(sidecar, endpoint?.port), config.listen.ops.port, 'the PodMonitor scrapes the ops port')
  t.equal(endpoint?.path, '/metrics', 'on /metrics')
})

t.test('the pod runs non-root on a read-only root, with its secrets and state where they belong', async (t) => {
  if (sidecar === undefined || podSpec === undefined) return t.fail('no sidecar')
  const nonRoot = sidecar.securityContext?.runAsNonRoot ?? podSpec.securityContext?.runAsNonRoot
  const uid = sidecar.securityContext?.runAsUser ?? podSpec.securityContext?.runAsUser
  t.equal(nonRoot, true, 'runAsNonRoot')
  t.ok(typeof uid === 'number' && uid !== 0, `runs as uid ${String(uid)}`)
  for (const c of [sidecar, ...podSpec.containers]) {
    t.equal(c.securityContext?.readOnlyRootFilesystem, true, `${c.name}: read-only root filesystem`)
    t.equal(c.securityContext?.allowPrivilegeEscalation, false, `${c.name}: no privilege escalation`)
    t.same(c.securityContext?.capabilities?.drop, ['ALL'], `${c.name}: drops every capability`)
  }
  const stateMount = sidecar.volumeMounts?.find((m) => m.mountPath === config.stateDir)
  t.ok(stateMount, `stateDir ${config.stateDir} is a mount`)
  t.ok(volume(stateMount?.name ?? '')?.emptyDir, 'on an emptyDir')
  t.notOk(stateMount?.readOnly, 'writable')
  // The kubelet evicts a pod whose emptyDir outgrows its sizeLimit: the limit must hold the
  // audit log at its cap (the current file and every rotated one) and leave room for the state
  // file, its copy while it is rewritten, the lock, the token and a state file copied aside.
  const auditCap = (AUDIT_FILES + 1) * AUDIT_MAX_BYTES / 2 ** 20
  const sizeLimit = volume(stateMount?.name ?? '')?.emptyDir?.sizeLimit
  t.ok(sizeLimit === undefined || mebibytes(sizeLimit) >= auditCap + 16, `the stateDir volume's sizeLimit (${String(sizeLimit)}) holds the audit log at its cap (${auditCap} MiB) and 16 MiB more`)

  const token = sidecar.env?.find((e) => e.name === 'BREAKWATER_ADMIN_TOKEN')
  t.ok(token?.valueFrom?.secretKeyRef?.name, 'BREAKWATER_ADMIN_TOKEN comes from a Secret')
  t.equal(token?.value, undefined, 'never a literal value')

  for (const c of [sidecar, ...podSpec.containers]) {
    t.ok(c.resources?.requests?.cpu !== undefined && c.resources?.requests?.memory !== undefined, `${c.name}: CPU and memory requests`)
    t.ok(c.resources?.limits?.memory !== undefined, `${c.name}: a memory limit`)
  }
  // bench/README.md: about 141 MiB holding 1,000 connections, 186 MiB the highest seen.
  t.ok(mebibytes(sidecar.resources?.limits?.memory) >= 186, `the sidecar's memory limit (${String(sidecar.resources?.limits?.memory)}) is above the highest RSS the bench saw`)
  t.ok(mebibytes(sidecar.resources?.requests?.memory) >= 90, 'its request covers the idle RSS (90 MiB)')
})

function mebibytes (quantity: unknown): number {
  const m = /^(\d+)(Mi|Gi)$/.exec(String(quantity))
  if (m === null) return 0
  return Number(m[1]) * (m[2] === 'Gi' ? 1024 : 1)
}

t.test('the grace period outlasts the app\'s stop and then Breakwater\'s whole drain', async (t) => {
  const grace = podSpec?.terminationGracePeriodSeconds ?? 30
  const preStop = app?.lifecycle?.preStop?.sleep?.seconds ?? 0
  const drainSeconds = (config.shutdown.drainDelayMs + config.shutdown.timeoutMs) / 1000
  t.equal(drainSeconds, 25, 'Breakwater\'s drain is bounded by 25 s (5 s + 20 s)')
  t.ok(preStop > 0, `the app keeps serving ${preStop} s after termination starts (preStop sleep)`)
  // Native sidecars get SIGTERM only after the app has exited: the budget is sequential.
  t.ok(grace > preStop + drainSeconds, `terminationGracePeriodSeconds ${grace} > ${preStop} + ${drainSeconds}`)
})

t.test('breakwater validate accepts the config, and the flag file it reads', async (t) => {
  const valid = await runCli(['validate', '--config', configPath])
  t.equal(valid.code, 0, 'exit 0', { stdout: valid.stdout, stderr: valid.stderr })
  t.match(valid.stdout, /valid/, valid.stdout.trim())

  // With the flag file where the pod mounts it, validate parses it too.
  const dir = tempDir(t)
  copyFileSync(join(DIR, 'flags.json'), join(dir, 'flags.json'))
  const raw = parse(readFileSync(configPath, 'utf8')) as Record<string, any>
  raw.flagSource.path = join(dir, 'flags.json')
  raw.stateDir = join(dir, 'state')
  writeFileSync(join(dir, 'breakwater.yaml'), stringify(raw))
  const withFlags = await runCli(['validate', '--config', join(dir, 'breakwater.yaml')])
  t.equal(withFlags.code, 0, 'valid with the flag file in place', { stdout: withFlags.stdout, stderr: withFlags.stderr })
  t.notMatch(withFlags.stdout + withFlags.stderr, /warning/i, 'and without a warning')

  const flags = JSON.parse(readFileSync(join(DIR, 'flags.json'), 'utf8')) as { flags: Record<string, unknown> }
  for (const route of config.routes) {
    if (route.killSwitch === null) continue
    t.ok(route.killSwitch in flags.flags, `the kill switch ${route.killSwitch} of route ${route.name} is in flags.json`)
  }
})
