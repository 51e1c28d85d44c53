// The upstream and the targets under test. Config files are written into the
// run's temporary directory.
import { existsSync, mkdirSync, writeFileSync, readFileSync, rmdirSync } from 'node:fs'
import { join } from 'node:path'
import { execFileSync } from 'node:child_process'
import { commandExists, freePort, startProcess, stopProcess, waitReady, pidsOf, tail } from './processes.mjs'

export const LOADGEN_CPU = 0
export const UPSTREAM_CPU = 0
export const PROXY_CPU = 1

export const ALL_TARGETS = [
  'direct',
  'breakwater',
  'breakwater-1acceptor',
  'breakwater-log',
  'breakwater-log10',
  'breakwater-bare',
  'breakwater-stages',
  'breakwater-trace0',
  'breakwater-trace1',
  'breakwater-trace100',
  'breakwater-trace100json',
  'breakwater-tls',
  'breakwater-full',
  'fastify-http-proxy',
  'node-floor',
  'node-http',
  'nginx',
  'haproxy'
]

const nginxBin = commandExists('nginx') ?? (existsSync('/usr/sbin/nginx') ? '/usr/sbin/nginx' : null)
const etcdBin = commandExists('etcd') ?? (existsSync('/usr/bin/etcd') ? '/usr/bin/etcd' : null)
const haproxyBin = commandExists('haproxy') ?? (existsSync('/usr/sbin/haproxy') ? '/usr/sbin/haproxy' : null)
export const tools = { nginx: nginxBin, haproxy: haproxyBin }

function nginxCommon (dir) {
  return [
    'worker_processes 1;',
    'daemon off;',
    'master_process on;',
    'worker_rlimit_nofile 16384;',
    `pid ${join(dir, 'nginx.pid')};`,
    `error_log ${join(dir, 'error.log')} warn;`,
    'events { worker_connections 8192; multi_accept on; }'
  ]
}

function nginxHttpCommon (dir) {
  return [
    '  access_log off;',
    '  keepalive_requests 1000000;',
    '  keepalive_timeout 120s;',
    `  client_body_temp_path ${join(dir, 'client_body')};`,
    `  proxy_temp_path ${join(dir, 'proxy')};`,
    `  fastcgi_temp_path ${join(dir, 'fastcgi')};`,
    `  uwsgi_temp_path ${join(dir, 'uwsgi')};`,
    `  scgi_temp_path ${join(dir, 'scgi')};`
  ]
}

export function nginxUpstreamConf (dir, port) {
  return [
    ...nginxCommon(dir),
    'http {',
    ...nginxHttpCommon(dir),
    '  server {',
    `    listen 127.0.0.1:${port} backlog=4096;`,
    '    default_type text/plain;',
    '    location / { return 200 "ok\\n"; }',
    '  }',
    '}',
    ''
  ].join('\n')
}

export function nginxProxyConf (dir, port, upstreamPort) {
  return [
    ...nginxCommon(dir),
    'http {',
    ...nginxHttpCommon(dir),
    `  upstream app { server 127.0.0.1:${upstreamPort}; keepalive 256; keepalive_requests 1000000; }`,
    '  server {',
    `    listen 127.0.0.1:${port} backlog=4096;`,
    '    location / {',
    '      proxy_pass http://app;',
    '      proxy_http_version 1.1;',
    '      proxy_set_header Connection "";',
    '    }',
    '  }',
    '}',
    ''
  ].join('\n')
}

export function haproxyConf (port, upstreamPort) {
  return [
    'global',
    '  nbthread 1',
    '  maxconn 8000',
    'defaults',
    '  mode http',
    '  option http-keep-alive',
    '  http-reuse always',
    '  timeout connect 5s',
    '  timeout client 120s',
    '  timeout server 120s',
    '  timeout http-keep-alive 120s',
    'frontend fe',
    `  bind 127.0.0.1:${port}`,
    '  default_backend app',
    'backend app',
    `  server app1 127.0.0.1:${upstreamPort}`,
    ''
  ].join('\n')
}

/** The Breakwater config the harness generates (format fixed by the project). */
export function breakwaterYaml ({ stateDir, proxyPort, opsPort, adminPort, upstreamPort, accessLog, stages = false, sampleRatio = null, protocol = 'http/protobuf', tls = null, acceptors = null }) {
  return [
    'service: bench',
    'version: bench',
    `stateDir: ${stateDir}`,
    'listen:',
    // breakwater-tls: the proxy listener serves HTTPS (a self-signed certificate made for the run).
    `  proxy: { host: 127.0.0.1, port: ${proxyPort}${acceptors === null ? '' : `, acceptors: ${acceptors}`}${tls === null ? '' : `, tls: { cert: ${tls.cert}, key: ${tls.key} }`} }`,
    `  ops:   { host: 127.0.0.1, port: ${opsPort} }`,
    `  admin: { host: 127.0.0.1, port: ${adminPort} }`,
    'upstreams:',
    `  app: { url: http://127.0.0.1:${upstreamPort} }`,
    'routes:',
    '  - match: { pathPrefix: / }',
    '    upstream: app',
    // breakwater-stages: the route behind a kill switch and a circuit breaker, and two
    // rollback triggers watching its traffic (the resilience features on the request path).
    ...(stages
      ? [
          '    killSwitch: benchFeature',
          'featureFlags: { benchFeature: true }',
          'circuitBreakers:',
          '  app: { failureThreshold: 0.5, volumeThreshold: 20 }',
          'rollbackTriggers:',
          '  - { metric: error_rate, threshold: 0.05, window: 5m, action: notify }',
          '  - { metric: p99_latency, threshold: 2000, window: 2m, action: notify }'
        ]
      : []),
    // accessLog: true, false or a sample rate (breakwater-log10: one request in ten).
    `logging: { level: info, accessLog: ${String(accessLog)} }`,
    // breakwater-trace0/-trace1/-trace100: spans sampled at 0 % / 1 % / 100 %, exported over OTLP/HTTP (protobuf;
    // -trace100json: JSON) to the upstream, which answers every path 200 (a collector that accepts
    // everything, on CPU 0).
    ...(sampleRatio === null ? [] : [`tracing: { otlpEndpoint: http://127.0.0.1:${upstreamPort}, sampleRatio: ${sampleRatio}, protocol: ${protocol} }`]),
    ''
  ].join('\n')
}

/**
 * breakwater-full: every feature configured at once, as a production sidecar might be — a TLS
 * egress listener, a second upstream with two endpoints as failover, health checks, kill
 * switches from featureFlags, a flagd flag file and a flag provider, retries, a rate limit, a
 * fallback cache, fault injection, a circuit breaker, rollback triggers with a webhook rollback,
 * every notification channel, synthetic verification, tracing at 1 %, limits and (when etcd is
 * installed) the fleet. The traffic takes the `/` route: kill switch, circuit breaker and
 * triggers on the request path, as in breakwater-stages. Webhooks and the collector point at
 * the upstream (nothing fires while the upstream answers 200).
 */
export function breakwaterFullYaml ({ dir, stateDir, proxyPort, egressPort, opsPort, adminPort, upstreamPort, tls, etcdUrl }) {
  const up = `http://127.0.0.1:${upstreamPort}`
  writeFileSync(join(dir, 'flags.json'), JSON.stringify({
    flags: { fileFlag: { state: 'ENABLED', variants: { on: true, off: false }, defaultVariant: 'on', targeting: { if: [{ in: ['beta', { var: 'targetingKey' }] }, 'off', null] } } }
  }))
  writeFileSync(join(dir, 'provider.mjs'), [
    'export default class StaticProvider {',
    "  constructor (options) { this.metadata = { name: 'static' }; this.runsOn = 'server'; this.flags = options.flags }",
    "  async resolveBooleanEvaluation (key, value) { return key in this.flags ? { value: this.flags[key], reason: 'STATIC' } : { value, reason: 'ERROR', errorCode: 'FLAG_NOT_FOUND' } }",
    '  async resolveStringEvaluation (key, value) { return { value } }',
    '  async resolveNumberEvaluation (key, value) { return { value } }',
    '  async resolveObjectEvaluation (key, value) { return { value } }',
    '}',
    ''
  ].join('\n'))
  return [
    'service: bench',
    'version: bench',
    `stateDir: ${stateDir}`,
    'listen:',
    `  proxy: { host: 127.0.0.1, port: ${proxyPort} }`,
    `  egress: { host: 127.0.0.1, port: ${egressPort}, tls: { cert: ${tls.cert}, key: ${tls.key} } }`,
    `  ops:   { host: 127.0.0.1, port: ${opsPort} }`,
    `  admin: { host: 127.0.0.1, port: ${adminPort} }`,
    'upstreams:',
    `  app: { url: ${up}, critical: true, healthCheck: { path: /health }, failover: spare }`,
    `  spare: { endpoints: [${up}, http://localhost:${upstreamPort}], balance: least_request }`,
    'routes:',
    '  - match: { pathPrefix: /api }',
    '    upstream: app',
    '    killSwitch: fileFlag',
    '    retries: { attempts: 2 }',
    '    rateLimit: { requestsPerSecond: 100000, key: client }',
    '    fallback: { staleIfError: 1m, cache: { maxBytes: 1048576 } }',
    '    fault: { flag: providerFlag, abortPercent: 0 }',
    '  - match: { pathPrefix: / }',
    '    upstream: app',
    '    killSwitch: benchFeature',
    '  - match: { pathPrefix: / }',
    '    listener: egress',
    '    upstream: spare',
    'featureFlags: { benchFeature: true, fileFlag: true, providerFlag: true }',
    `flagSource: { type: flagd-file, path: ${join(dir, 'flags.json')} }`,
    `flagProvider: { module: ${join(dir, 'provider.mjs')}, options: { flags: { providerFlag: true } } }`,
    'circuitBreakers:',
    '  app: { failureThreshold: 0.5, volumeThreshold: 20 }',
    'rollbackTriggers:',
    '  - { metric: error_rate, threshold: 0.05, window: 5m, action: rollback }',
    '  - { metric: p99_latency, threshold: 2000, window: 2m, action: notify }',
    '  - { metric: error_rate, threshold: 0.5, window: 1m, action: killSwitch, flags: [benchFeature] }',
    `rollback: { type: webhook, url: ${up}/rollback }`,
    'notifications:',
    `  slackWebhookUrl: ${up}/slack`,
    '  pagerDutyRoutingKey: bench',
    `  pagerDutyUrl: ${up}/pagerduty`,
    '  statusPageId: bench',
    '  statusPageApiKey: bench',
    `  statusPageUrl: ${up}`,
    `  webhooks: [${up}/hook]`,
    `  alertmanager: { urls: [${up}] }`,
    'verification: { synthetics: [{ path: /health }] }',
    `tracing: { otlpEndpoint: ${up}, sampleRatio: 0.01 }`,
    ...(etcdUrl === null ? [] : [`fleet: { etcd: { endpoints: [${etcdUrl}] } }`]),
    'logging: { level: info, accessLog: false }',
    'limits: { maxInFlight: 10000, maxConnections: 5000 }',
    ''
  ].join('\n')
}

let etcd = null

/** One etcd for the run's breakwater-full instances (on the upstream's CPU); null without etcd. */
async function benchEtcd (tmp) {
  if (etcdBin === null || process.env.BENCH_FULL_FLEET === '0') return null
  if (etcd !== null && !etcd.proc.exited) return etcd.url
  const dir = join(tmp, 'etcd')
  mkdirSync(dir, { recursive: true })
  const [client, peer] = [await freePort(), await freePort()]
  const url = `http://127.0.0.1:${client}`
  const proc = startProcess({
    name: 'etcd',
    cmd: etcdBin,
    args: ['--name', 'bench', '--data-dir', join(dir, 'data'), '--listen-client-urls', url, '--advertise-client-urls', url,
      '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
      '--initial-cluster', `bench=http://127.0.0.1:${peer}`],
    cpu: UPSTREAM_CPU,
    stderr: join(dir, 'stderr.log')
  })
  try {
    await waitReady(proc, [`${url}/health`], 10_000)
  } catch (err) {
    await stopProcess(proc)
    throw new Error(`etcd failed to start: ${err.message}\n${tail(join(dir, 'stderr.log'))}`)
  }
  etcd = { proc, url }
  return url
}

/**
 * Node's flags and glibc's arena limit for every breakwater target: those the Dockerfile's CMD
 * and ENV set (see "Memory" in README.md), unless BENCH_NODE_FLAGS ("" for none) or
 * BENCH_MALLOC_ARENA_MAX ("" for glibc's default) give others to compare.
 */
export const SHIPPED_NODE_FLAGS = ['--max-semi-space-size=8']
export const SHIPPED_MALLOC_ARENA_MAX = ''

function nodeFlags () {
  const given = process.env.BENCH_NODE_FLAGS
  return given === undefined ? SHIPPED_NODE_FLAGS : given.split(/\s+/).filter(Boolean)
}

function mallocArenaMax (env) {
  const value = process.env.BENCH_MALLOC_ARENA_MAX ?? SHIPPED_MALLOC_ARENA_MAX
  if (value === '') delete env.MALLOC_ARENA_MAX
  else env.MALLOC_ARENA_MAX = value
  return env
}

/**
 * BENCH_MEMORY_LIMIT_MIB=N: every Node target (breakwater*, node-floor, fastify-http-proxy,
 * node-http) starts inside a memory cgroup of its own limited to N MiB, as in a pod with
 * `limits.memory`. Node sizes V8's heap from that limit (`process.constrainedMemory()`), so this
 * measures what a pod runs, not what an unconstrained host does. cgroup v2 (`memory.max`) or
 * v1 (`memory.limit_in_bytes`); needs write access to /sys/fs/cgroup. The process is put in the
 * cgroup by a shell that then execs Node, so the limit holds from its first byte.
 */
const memoryLimitMiB = Number(process.env.BENCH_MEMORY_LIMIT_MIB ?? 0)
const cgroups = new Set()
process.on('exit', () => { for (const c of cgroups) c.remove() })

function memoryCgroup (name) {
  const v2 = existsSync('/sys/fs/cgroup/cgroup.controllers')
  const dir = v2 ? `/sys/fs/cgroup/bench-${name}-${process.pid}` : `/sys/fs/cgroup/memory/bench-${name}-${process.pid}`
  mkdirSync(dir, { recursive: true })
  writeFileSync(join(dir, v2 ? 'memory.max' : 'memory.limit_in_bytes'), String(memoryLimitMiB * 1024 * 1024))
  if (v2) writeFileSync(join(dir, 'memory.swap.max'), '0')
  return {
    dir,
    /** OOM kills in this cgroup so far. */
    oomKills () {
      const text = readFileSync(join(dir, v2 ? 'memory.events' : 'memory.oom_control'), 'utf8')
      return Number(/oom_kill (\d+)/.exec(text)?.[1] ?? 0)
    },
    remove () { try { rmdirSync(dir) } catch {} }
  }
}

/** `cmd args` run inside a memory cgroup when BENCH_MEMORY_LIMIT_MIB is set. */
function limited (name, cmd, args) {
  if (!(memoryLimitMiB > 0)) return { cmd, args, cgroup: null }
  const cgroup = memoryCgroup(name)
  cgroups.add(cgroup)
  return { cmd: 'sh', args: ['-c', 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup.dir, cmd, ...args], cgroup }
}

function envWithout (...names) {
  const env = { ...process.env }
  for (const n of names) delete env[n]
  return env
}

/** Start the upstream ("the service"): nginx if installed, else bench/upstream.mjs. */
export async function startUpstream ({ tmp, benchDir, forceNode }) {
  const dir = join(tmp, 'upstream')
  mkdirSync(dir, { recursive: true })
  const port = await freePort()
  let proc
  let kind
  if (nginxBin && !forceNode) {
    kind = 'nginx'
    const conf = join(dir, 'nginx.conf')
    writeFileSync(conf, nginxUpstreamConf(dir, port))
    proc = startProcess({
      name: 'upstream',
      cmd: nginxBin,
      args: ['-p', dir, '-c', conf],
      cpu: UPSTREAM_CPU,
      stderr: join(dir, 'stderr.log')
    })
  } else {
    kind = 'node:http'
    proc = startProcess({
      name: 'upstream',
      cmd: process.execPath,
      args: [join(benchDir, 'upstream.mjs'), String(port)],
      cpu: UPSTREAM_CPU,
      stderr: join(dir, 'stderr.log')
    })
  }
  const url = `http://127.0.0.1:${port}/`
  try {
    await waitReady(proc, [url], 10_000)
  } catch (err) {
    await stopProcess(proc)
    throw new Error(`upstream (${kind}) failed to start: ${err.message}\n${tail(proc.stderrFile)}\n${tail(join(dir, 'error.log'))}`)
  }
  return { kind, port, url, proc }
}

/**
 * Start one target. Resolves to { name, url, proc } (proc null for direct).
 * Throws Error with a reason if it cannot start.
 */
export async function startTarget (name, { tmp, repoRoot, benchDir, upstream, instance = 0, flags = nodeFlags() }) {
  if (name === 'direct') return { name, url: upstream.url, proc: null }
  const dir = join(tmp, `${name}-${instance}`)
  mkdirSync(dir, { recursive: true })
  const port = await freePort()
  const tls = name === 'breakwater-tls' || name === 'breakwater-full' ? selfSignedCertificate(dir) : null
  const url = `${name === 'breakwater-tls' ? 'https' : 'http'}://127.0.0.1:${port}/`
  const stderr = join(dir, 'stderr.log')
  let proc
  let readyUrls = [url]
  let timeoutMs = 10_000
  let extraLog = null
  let cgroup = null

  if (name.startsWith('breakwater')) {
    const cli = join(repoRoot, 'dist', 'cli.js')
    if (!existsSync(cli)) throw new Error('dist/cli.js not found (run `npm run build`)')
    const opsPort = await freePort()
    const adminPort = await freePort()
    const conf = join(dir, 'breakwater.yaml')
    const full = name === 'breakwater-full'
      ? { dir, stateDir: join(dir, 'state'), proxyPort: port, egressPort: await freePort(), opsPort, adminPort, upstreamPort: upstream.port, tls, etcdUrl: await benchEtcd(tmp) }
      : null
    writeFileSync(conf, full !== null ? breakwaterFullYaml(full) : breakwaterYaml({
      stateDir: join(dir, 'state'),
      proxyPort: port,
      opsPort,
      adminPort,
      upstreamPort: upstream.port,
      accessLog: name === 'breakwater-log' ? true : name === 'breakwater-log10' ? 0.1 : false,
      stages: name === 'breakwater-stages',
      sampleRatio: name === 'breakwater-trace0' ? 0 : name === 'breakwater-trace1' ? 0.01 : name.startsWith('breakwater-trace100') ? 1 : null,
      protocol: name === 'breakwater-trace100json' ? 'http/json' : 'http/protobuf',
      acceptors: name === 'breakwater-1acceptor' ? 1 : null,
      tls
    }))
    const env = mallocArenaMax(envWithout('BREAKWATER_BENCH_BARE'))
    if (name === 'breakwater-bare') env.BREAKWATER_BENCH_BARE = '1'
    const stdout = name === 'breakwater-log' || name === 'breakwater-log10' ? 'ignore' : join(dir, 'stdout.log')
    const run = limited(`${name}-${instance}`, process.execPath, [...flags, cli, 'start', '--config', conf])
    cgroup = run.cgroup
    proc = startProcess({
      name,
      cmd: run.cmd,
      args: run.args,
      cpu: PROXY_CPU,
      env,
      cwd: repoRoot,
      stdout,
      stderr
    })
    extraLog = stdout === 'ignore' ? null : stdout
    readyUrls = [`http://127.0.0.1:${opsPort}/health`, url]
    timeoutMs = 20_000
  } else if (NODE_SCRIPTS[name] !== undefined) {
    const run = limited(`${name}-${instance}`, process.execPath, [join(benchDir, NODE_SCRIPTS[name]), String(port), `http://127.0.0.1:${upstream.port}`])
    cgroup = run.cgroup
    proc = startProcess({
      name,
      cmd: run.cmd,
      args: run.args,
      cpu: PROXY_CPU,
      cwd: repoRoot,
      stderr
    })
  } else if (name === 'nginx') {
    if (!nginxBin) throw new Error('nginx not installed')
    const conf = join(dir, 'nginx.conf')
    writeFileSync(conf, nginxProxyConf(dir, port, upstream.port))
    proc = startProcess({ name, cmd: nginxBin, args: ['-p', dir, '-c', conf], cpu: PROXY_CPU, stderr })
    extraLog = join(dir, 'error.log')
  } else if (name === 'haproxy') {
    if (!haproxyBin) throw new Error('haproxy not installed')
    const conf = join(dir, 'haproxy.cfg')
    writeFileSync(conf, haproxyConf(port, upstream.port))
    proc = startProcess({ name, cmd: haproxyBin, args: ['-db', '-f', conf], cpu: PROXY_CPU, stderr })
  } else {
    throw new Error(`unknown target ${name}`)
  }

  try {
    await waitReady(proc, readyUrls, timeoutMs)
  } catch (err) {
    await stopProcess(proc)
    const logs = [tail(stderr), tail(extraLog)].filter(Boolean).join('\n')
    throw new Error(`${err.message}${logs ? `\n${logs}` : ''}`)
  }
  return { name, url, proc, cgroup, pids: () => pidsOf(proc) }
}

/** A P-256 certificate for 127.0.0.1 and its key, written into `dir` (autocannon does not verify it). */
function selfSignedCertificate (dir) {
  const cert = join(dir, 'tls.crt')
  const key = join(dir, 'tls.key')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { stdio: 'ignore' })
  return { cert, key }
}

/**
 * Node targets that are one script: `node SCRIPT <port> <upstream-url>`. `node-floor` is the
 * hand-written forwarder (node:http to an undici pool, nothing else); `node-http` is a bare
 * node:http server answering `ok` itself (bench/upstream.mjs, no upstream): what Node alone
 * holds per connection.
 */
const NODE_SCRIPTS = {
  'fastify-http-proxy': 'proxies/fastify-http-proxy.mjs',
  'node-floor': 'proxies/node-floor.mjs',
  'node-http': 'upstream.mjs'
}

export function targetAvailability (name) {
  if ((name === 'breakwater-tls' || name === 'breakwater-full') && !commandExists('openssl')) return 'openssl not installed'
  if (name === 'nginx' && !nginxBin) return 'nginx not installed'
  if (name === 'haproxy' && !haproxyBin) return 'haproxy not installed'
  return null
}
