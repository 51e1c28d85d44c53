// The upstream and the targets under test. Config files are written into the
// run's temporary directory.
import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { execFileSync } from 'node:child_process'
import { commandExists, freePort, startProcess, stopProcess, waitReady, pidsOf, tail } from './processes.mjs'

export const LOADGEN_CPU = 0
export const UPSTREAM_CPU = 0
export const PROXY_CPU = 1

export const ALL_TARGETS = [
  'direct',
  'breakwater',
  'breakwater-log',
  'breakwater-log10',
  'breakwater-bare',
  'breakwater-stages',
  'breakwater-trace1',
  'breakwater-trace100',
  'breakwater-trace100json',
  'breakwater-tls',
  'fastify-http-proxy',
  'nginx',
  'haproxy'
]

const nginxBin = commandExists('nginx') ?? (existsSync('/usr/sbin/nginx') ? '/usr/sbin/nginx' : null)
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
export function breakwaterYaml ({ stateDir, proxyPort, opsPort, adminPort, upstreamPort, accessLog, stages = false, sampleRatio = null, protocol = 'http/protobuf', tls = null }) {
  return [
    'service: bench',
    'version: bench',
    `stateDir: ${stateDir}`,
    'listen:',
    // breakwater-tls: the proxy listener serves HTTPS (a self-signed certificate made for the run).
    `  proxy: { host: 127.0.0.1, port: ${proxyPort}${tls === null ? '' : `, tls: { cert: ${tls.cert}, key: ${tls.key} }`} }`,
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
    // breakwater-trace1/-trace100: spans sampled at 1 % / 100 %, exported over OTLP/HTTP (protobuf;
    // -trace100json: JSON) to the upstream, which answers every path 200 (a collector that accepts
    // everything, on CPU 0).
    ...(sampleRatio === null ? [] : [`tracing: { otlpEndpoint: http://127.0.0.1:${upstreamPort}, sampleRatio: ${sampleRatio}, protocol: ${protocol} }`]),
    ''
  ].join('\n')
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
export async function startTarget (name, { tmp, repoRoot, benchDir, upstream, instance = 0 }) {
  if (name === 'direct') return { name, url: upstream.url, proc: null }
  const dir = join(tmp, `${name}-${instance}`)
  mkdirSync(dir, { recursive: true })
  const port = await freePort()
  const tls = name === 'breakwater-tls' ? selfSignedCertificate(dir) : null
  const url = `${tls === null ? 'http' : 'https'}://127.0.0.1:${port}/`
  const stderr = join(dir, 'stderr.log')
  let proc
  let readyUrls = [url]
  let timeoutMs = 10_000
  let extraLog = null

  if (name.startsWith('breakwater')) {
    const cli = join(repoRoot, 'dist', 'cli.js')
    if (!existsSync(cli)) throw new Error('dist/cli.js not found (run `npm run build`)')
    const opsPort = await freePort()
    const adminPort = await freePort()
    const conf = join(dir, 'breakwater.yaml')
    writeFileSync(conf, breakwaterYaml({
      stateDir: join(dir, 'state'),
      proxyPort: port,
      opsPort,
      adminPort,
      upstreamPort: upstream.port,
      accessLog: name === 'breakwater-log' ? true : name === 'breakwater-log10' ? 0.1 : false,
      stages: name === 'breakwater-stages',
      sampleRatio: name === 'breakwater-trace1' ? 0.01 : name.startsWith('breakwater-trace100') ? 1 : null,
      protocol: name === 'breakwater-trace100json' ? 'http/json' : 'http/protobuf',
      tls
    }))
    const env = envWithout('BREAKWATER_BENCH_BARE')
    if (name === 'breakwater-bare') env.BREAKWATER_BENCH_BARE = '1'
    const stdout = name === 'breakwater-log' || name === 'breakwater-log10' ? 'ignore' : join(dir, 'stdout.log')
    proc = startProcess({
      name,
      cmd: process.execPath,
      args: [cli, 'start', '--config', conf],
      cpu: PROXY_CPU,
      env,
      cwd: repoRoot,
      stdout,
      stderr
    })
    extraLog = stdout === 'ignore' ? null : stdout
    readyUrls = [`http://127.0.0.1:${opsPort}/health`, url]
    timeoutMs = 20_000
  } else if (name === 'fastify-http-proxy') {
    proc = startProcess({
      name,
      cmd: process.execPath,
      args: [join(benchDir, 'proxies', 'fastify-http-proxy.mjs'), String(port), `http://127.0.0.1:${upstream.port}`],
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
  return { name, url, proc, pids: () => pidsOf(proc) }
}

/** A P-256 certificate for 127.0.0.1 and its key, written into `dir` (autocannon does not verify it). */
function selfSignedCertificate (dir) {
  const cert = join(dir, 'tls.crt')
  const key = join(dir, 'tls.key')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { stdio: 'ignore' })
  return { cert, key }
}

export function targetAvailability (name) {
  if (name === 'breakwater-tls' && !commandExists('openssl')) return 'openssl not installed'
  if (name === 'nginx' && !nginxBin) return 'nginx not installed'
  if (name === 'haproxy' && !haproxyBin) return 'haproxy not installed'
  return null
}
