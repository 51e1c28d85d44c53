/**
 * Defaults are declared once, in the schema: the generated JSON schema shows them to editors,
 * the loader fills in exactly those, and no code in `src/config/` keeps a default of its own.
 */
import t from 'tap'
import { readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { resolveConfig } from '../src/config/load.js'
import { createPki } from './helpers/certificates.js'
import { ROOT } from './helpers/root.js'

interface Schema {
  default?: unknown
  const?: unknown
  required?: string[]
  properties?: Record<string, Schema>
  patternProperties?: Record<string, Schema>
  items?: Schema
  anyOf?: Schema[]
  dependencies?: Record<string, string[]>
}
const schema = JSON.parse(readFileSync(join(ROOT, 'config', 'breakwater.schema.json'), 'utf8')) as Schema

type Json = Record<string, unknown>
const isObject = (v: unknown): v is Json => v !== null && typeof v === 'object' && !Array.isArray(v)

/** Every key path in the JSON schema that declares a default (`[]` a list item, `*` a map value). */
function declaredDefaults (s: Schema, at: string, out: Set<string>): Set<string> {
  if (s.default !== undefined && at !== '') out.add(at)
  for (const [key, child] of Object.entries(s.properties ?? {})) declaredDefaults(child, at === '' ? key : `${at}.${key}`, out)
  for (const child of Object.values(s.patternProperties ?? {})) declaredDefaults(child, `${at}.*`, out)
  if (s.items !== undefined) declaredDefaults(s.items, `${at}.[]`, out)
  for (const member of s.anyOf ?? []) declaredDefaults(member, at, out)
  return out
}

/** The member of a union of objects that `value` is written for (its `const` keys match). */
function member (s: Schema, value: Json): Schema | undefined {
  return s.anyOf?.find((m) => m.properties !== undefined && Object.entries(m.properties).every(([k, p]) => p.const === undefined || p.const === value[k]))
}

/**
 * `value` with every default the JSON schema declares written out, as a user who spelt each
 * one would write it; `reached` collects the key paths filled. A key whose `dependencies`
 * are not written is left out (writing it would be a config error).
 */
function writeDefaults (s: Schema, value: unknown, at: string, reached: Set<string>): unknown {
  if (Array.isArray(value)) return s.items === undefined ? value : value.map((v) => writeDefaults(s.items as Schema, v, `${at}.[]`, reached))
  if (!isObject(value)) return value
  const own = s.anyOf === undefined ? s : member(s, value)
  if (own === undefined) return value
  const out: Json = { ...value }
  for (const [key, child] of Object.entries(own.properties ?? {})) {
    const path = at === '' ? key : `${at}.${key}`
    const needs = own.dependencies?.[key] ?? []
    if (out[key] === undefined && child.default !== undefined && needs.every((n) => out[n] !== undefined)) {
      out[key] = structuredClone(child.default)
      reached.add(path)
    }
    if (out[key] !== undefined) {
      if (child.default !== undefined) reached.add(path) // written, so the defaults under it are reached
      out[key] = writeDefaults(child, out[key], path, reached)
    }
  }
  const pattern = Object.values(own.patternProperties ?? {})[0]
  if (pattern !== undefined) {
    for (const key of Object.keys(out)) if (own.properties?.[key] === undefined) out[key] = writeDefaults(pattern, out[key], `${at}.*`, reached)
  }
  return out
}

/** Every section that has defaults, opened with only its required keys. */
function everySection (pem: { cert: string, key: string, ca: string }, rollback: Json): Json {
  return {
    service: 's',
    listen: {
      proxy: { tls: { cert: pem.cert, key: pem.key } },
      egress: { tls: { cert: pem.cert, key: pem.key } }
    },
    upstreams: {
      app: { url: 'http://127.0.0.1:3000', healthCheck: { path: '/h' }, failover: 'dr' },
      dr: { url: 'https://127.0.0.1:3001', tls: {} }
    },
    routes: [
      { match: { pathPrefix: '/a' }, upstream: 'app', retries: { attempts: 1 }, fault: {}, rateLimit: { requestsPerSecond: 2.5 }, fallback: { staleIfError: '1m' } },
      { match: { pathPrefix: '/b' }, upstream: 'app', listener: 'egress', fallback: { status: 503 } },
      { match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    flagSource: { type: 'flagd-file', path: '/nonexistent/flags.json' },
    flagProvider: { module: '@openfeature/server-sdk' },
    tracing: { otlpEndpoint: 'http://127.0.0.1:4318', sampleRatio: 0.5 },
    circuitBreakers: { app: {} },
    rollback,
    rollbackTriggers: [{ metric: 'error_rate', threshold: 0.5, window: '1m', action: 'notify' }],
    notifications: { alertmanager: { urls: ['http://127.0.0.1:9093'] } },
    fleet: { etcd: { endpoints: ['http://127.0.0.1:2379'] } },
    verification: { synthetics: [{ path: '/' }] }
  }
}

const ROLLBACKS: Json[] = [
  { type: 'webhook', url: 'http://127.0.0.1:9/rollback' },
  { type: 'exec', command: ['true'] },
  { type: 'git', repo: '/tmp/repo', branch: 'main' }
]

t.test('every default the JSON schema shows is the one the loader uses', async (t) => {
  const pki = createPki(t)
  const pem = { ...pki.issue('server', 1), ca: pki.ca }
  const declared = declaredDefaults(schema, '', new Set())
  const reached = new Set<string>()
  for (const rollback of ROLLBACKS) {
    const written = everySection(pem, rollback)
    const spelt = writeDefaults(schema, written, '', reached)
    const implicit = resolveConfig(written, { env: {} }).config
    const explicit = resolveConfig(spelt, { env: {} }).config
    t.same(implicit, explicit, `rollback ${String(rollback.type)}: leaving every defaulted key out loads the same config as writing each default`)
  }
  const unreached = [...declared].filter((p) => !reached.has(p))
  t.same(unreached, [], 'the test config opens every section that declares defaults')
  t.ok(declared.size > 100, `${declared.size} defaults declared`)
})

t.test('defaults once moved from code into the schema load to the values they had', async (t) => {
  const pki = createPki(t)
  const pem = { ...pki.issue('server', 1), ca: pki.ca }
  const { config } = resolveConfig(everySection(pem, ROLLBACKS[0] as Json), { env: {} })
  t.equal(config.upstreams.app?.failbackAfterMs, 30_000, 'upstreams.X.failbackAfter: 30 s')
  t.equal(config.notifications.alertmanager?.repeatIntervalMs, 60_000, 'notifications.alertmanager.repeatInterval: 60 s')
  t.same(config.notifications.alertmanager?.labels, {}, 'notifications.alertmanager.labels: none')
  t.same(config.routes[0]?.rateLimit, { requestsPerSecond: 2.5, burst: 3, key: 'route', maxKeys: 100_000 }, 'rateLimit: key route, 100,000 keys, burst ⌈rps⌉')
  t.same(config.routes[0]?.fallback?.cache, { maxEntries: 1000, maxBytes: 10 * 1024 * 1024, maxEntryBytes: 1024 * 1024 }, 'fallback.cache: 1000 entries, 10 MiB, 1 MiB an entry')
  t.equal(config.routes[0]?.fallback?.static, null, 'no static fallback without status')
  t.same(config.routes[1]?.fallback?.static?.headers, [], 'fallback.headers: none')
  t.equal(config.routes[1]?.fallback?.cache, null, 'no cache without staleIfError')
  t.equal(config.fleet?.etcd.prefix, '/breakwater', 'fleet.etcd.prefix')
  t.equal(config.fleet?.leaseTtlMs, 10_000, 'fleet.leaseTtl: 10 s')
  t.same(config.tracing?.batch, { maxSize: 512, delayMs: 1000, timeoutMs: 10_000 }, 'tracing.batch: 512 spans, 1 s, 10 s')
  t.equal(config.limits.maxInFlight, 0, 'limits.maxInFlight: absent is unlimited')
  t.equal(config.circuitBreakers.app?.maxConcurrentRequests, 0, 'maxConcurrentRequests: absent is unlimited')
  const small = resolveConfig({ ...everySection(pem, ROLLBACKS[0] as Json), tracing: { otlpEndpoint: 'http://127.0.0.1:4318', sampleRatio: 1, maxQueueSize: 100 } }, { env: {} }).config
  t.equal(small.tracing?.batch.maxSize, 100, 'tracing.batch.maxSize: at most maxQueueSize')
  const entry = resolveConfig({ ...everySection(pem, ROLLBACKS[0] as Json), routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { staleIfError: '1m', cache: { maxBytes: 4096 } } }] }, { env: {} }).config
  t.same(entry.routes[0]?.fallback?.cache, { maxEntries: 1000, maxBytes: 4096, maxEntryBytes: 4096 }, 'fallback.cache.maxEntryBytes: at most maxBytes')
  t.equal(resolveConfig({ service: 's', upstreams: { app: { url: 'http://127.0.0.1:3000' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }, { env: {} }).config.listen.egress, null, 'a section that is off when absent has no default')
  t.equal(schema.properties?.listen?.properties?.egress?.default, undefined)
  t.equal(schema.properties?.listen?.properties?.egress?.properties?.port?.default, 14002, 'the egress listener has its own port default')
})

t.test('a key that needs another (the schema\'s dependencies) is refused without it, whatever its default', async (t) => {
  const base = { service: 's', upstreams: { a: { url: 'http://127.0.0.1:3000' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'a' }] }
  const problems = (config: Json): string[] => {
    try {
      resolveConfig(config, { env: {} })
      return []
    } catch (err) {
      return (err as { problems: string[] }).problems
    }
  }
  t.same(problems({ ...base, upstreams: { a: { url: 'http://127.0.0.1:3000', failbackAfter: '30s' } } }), ['upstreams.a.failbackAfter: needs failover'])
  t.same(problems({ ...base, routes: [{ match: { pathPrefix: '/' }, upstream: 'a', fallback: { status: 503, cache: {} } }] }), ['routes[0].fallback.cache: needs staleIfError'])
  t.same(problems(base), [], 'the defaults of failbackAfter and cache never count as written')
})

/**
 * `?? literal` in src/config/ that is not a config key's default. Anything else — a number,
 * a string, a boolean, `{}` or `[]` after `??` — is a default kept in code, and belongs in
 * the schema.
 */
const NOT_DEFAULTS: Record<string, string> = {
  "(err as Error).message.split('\\n')[0] ?? ''": 'the first line of an error message',
  "paths.cert ?? ''": 'a path in a problem message',
  "paths.key ?? ''": 'a path in a problem message',
  "paths.ca ?? ''": 'a path in a problem message',
  "f.body ?? ''": 'fallback.body and fallback.file exclude each other, so body cannot declare a default; absent, the body is empty',
  "match.pathPrefix ?? '/'": 'a route name derived from a match that names no path',
  'tr.flags ?? []': 'checking the entries of an optional list (absent: null in Config)',
  'tr.upstreams ?? []': 'checking the entries of an optional list (absent: null in Config)',
  '(schema.properties ?? {}': 'walking the schema itself, not a config',
  '(schema.patternProperties ?? {}': 'walking the schema itself, not a config'
}

t.test('no code in src/config keeps a default of its own', async (t) => {
  const dir = join(ROOT, 'src', 'config')
  const found: string[] = []
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.ts'))) {
    const text = readFileSync(join(dir, file), 'utf8')
    for (const m of text.matchAll(/([\w.()[\]'\\ ]*?)\s*\?\?\s*(-?[0-9][0-9_.e]*|'[^']*'|"[^"]*"|`[^`$]*`|true|false|\{\s*\}|\[\s*\])/g)) {
      const expression = `${(m[1] ?? '').trim()} ?? ${m[2] ?? ''}`
      if (Object.keys(NOT_DEFAULTS).some((allowed) => expression.endsWith(allowed))) continue
      found.push(`${file}: ${expression}`)
    }
  }
  t.same(found, [], 'a literal after ?? is a default: declare it in the schema with withDefault')
})
