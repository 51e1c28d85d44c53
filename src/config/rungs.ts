/**
 * The settings of the missing rungs (SPEC §17) — rate limits, fallbacks, failover, trusted
 * proxies — resolved from the validated input, with the checks a schema cannot make. Each
 * problem names its key.
 */
import { readFileSync, statSync } from 'node:fs'
import { BlockList, isIP } from 'node:net'
import { validateHeaderValue } from 'node:http'
import { resolve as resolvePath } from 'node:path'
import type { ConfigInput, ResolvedInput } from './schema.js'
import type { FallbackConfig, RateLimitConfig, UpstreamConfig } from './types.js'
import { durationMs } from './duration.js'

type RouteInput = ResolvedInput['routes'][number]

/** A static fallback `file` larger than this is a config error: it is held in memory. */
export const MAX_STATIC_FALLBACK_BYTES = 1024 * 1024

export function rateLimitConfig (r: RouteInput['rateLimit']): RateLimitConfig | null {
  if (r === undefined) return null
  const rps = r.requestsPerSecond // the schema refuses 0 and less
  const key = r.key as RateLimitConfig['key']
  return {
    requestsPerSecond: rps,
    burst: r.burst ?? Math.max(1, Math.ceil(rps)),
    key: key.startsWith('header:') ? `header:${key.slice(7).toLowerCase()}` : key,
    maxKeys: r.maxKeys
  }
}

export function fallbackConfig (f: RouteInput['fallback'], methods: string[] | undefined, at: string, baseDir: string, problems: string[], warnings: string[]): FallbackConfig | null {
  if (f === undefined) return null
  const staleIfErrorMs = f.staleIfError === undefined ? 0 : durationMs(f.staleIfError)
  const hasStatic = f.status !== undefined
  if (f.staleIfError === undefined && !hasStatic) problems.push(`${at}.fallback: needs staleIfError (serve the last good response) or status (a static response)`)
  if (f.body !== undefined && f.file !== undefined) problems.push(`${at}.fallback: use either body or file, not both`)
  if (f.staleIfError !== undefined && methods !== undefined && !methods.some((m) => m.toUpperCase() === 'GET' || m.toUpperCase() === 'HEAD')) {
    problems.push(`${at}.fallback.staleIfError: the route takes no GET or HEAD, and only their responses are stored`)
  }
  checkStaticHeaders(f, at, problems)
  warnSuccessToUnsafe(f.status, methods, at, warnings)
  const c = f.cache
  const cache = f.staleIfError === undefined ? null : { maxEntries: c.maxEntries, maxBytes: c.maxBytes, maxEntryBytes: Math.min(c.maxEntryBytes, c.maxBytes) }
  let body: Buffer = Buffer.from(f.body ?? '', 'utf8')
  if (f.file !== undefined) body = readStaticFile(resolvePath(baseDir, f.file), `${at}.fallback.file`, problems)
  return {
    staleIfErrorMs,
    cache,
    static: hasStatic
      ? {
          status: f.status as number,
          body,
          contentType: f.contentType ?? (f.file === undefined ? 'text/plain; charset=utf-8' : 'application/octet-stream'),
          headers: Object.entries(f.headers).map(([k, v]) => [k.toLowerCase(), v] as const)
        }
      : null
  }
}

/** RFC 9110 §9.2.1: the methods that ask for nothing to change. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE'])

/**
 * A static stand-in answers whatever method the route takes (SPEC §17). A 2xx to a POST, PUT,
 * PATCH or DELETE tells the client its write succeeded when it was refused, or timed out after
 * the app received it (its fate unknown): a client that trusts it never retries, and the write
 * may be lost. Allowed, since some routes mean it (a queue that accepts later), but said.
 */
function warnSuccessToUnsafe (status: number | undefined, methods: string[] | undefined, at: string, warnings: string[]): void {
  if (status === undefined || status < 200 || status > 299) return
  const unsafe = methods === undefined ? ['POST', 'PUT', 'PATCH', 'DELETE'] : [...new Set(methods.map((m) => m.toUpperCase()))].filter((m) => !SAFE_METHODS.has(m))
  if (unsafe.length === 0) return
  warnings.push(`${at}.fallback.status: ${status} is also the answer to unsafe methods (${unsafe.join(', ')}): a client is told its write succeeded when it was refused or timed out after the app received it; use a 5xx status (503), or match.methods: [GET, HEAD]`)
}

/** Framing is ours to set; and every value must be writable, or answering would throw at run time. */
function checkStaticHeaders (f: NonNullable<RouteInput['fallback']>, at: string, problems: string[]): void {
  for (const [name, value] of Object.entries(f.headers)) {
    const key = `${at}.fallback.headers.${name}`
    const lower = name.toLowerCase()
    if (lower === 'content-length' || lower === 'transfer-encoding' || lower === 'connection') problems.push(`${key}: set by Breakwater`)
    else if (lower === 'content-type') problems.push(`${key}: use fallback.contentType`)
    else if (!validHeaderValue(name, value)) problems.push(`${key}: not a valid header value`)
  }
  if (f.contentType !== undefined && !validHeaderValue('content-type', f.contentType)) problems.push(`${at}.fallback.contentType: not a valid header value`)
}

function validHeaderValue (name: string, value: string): boolean {
  try {
    validateHeaderValue(name, value)
    return true
  } catch {
    return false
  }
}

/** Read once, at load: a missing or oversized file is a problem naming the key. */
function readStaticFile (path: string, key: string, problems: string[]): Buffer {
  try {
    const size = statSync(path).size
    if (size > MAX_STATIC_FALLBACK_BYTES) {
      problems.push(`${key}: ${path} is ${size} bytes, more than the ${MAX_STATIC_FALLBACK_BYTES} a static fallback may hold`)
      return Buffer.alloc(0)
    }
    return readFileSync(path)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    problems.push(`${key}: ${code === 'ENOENT' ? `${path} does not exist` : `cannot read ${path}: ${(err as Error).message}`}`)
    return Buffer.alloc(0)
  }
}

/** `failover` targets: a known upstream, not itself, and one hop only (no chains, no loops). */
export function checkFailover (upstreams: ConfigInput['upstreams'], problems: string[]): void {
  for (const [name, u] of Object.entries(upstreams)) {
    const target = u.failover
    if (target === undefined) continue
    const at = `upstreams.${name}.failover`
    if (target === name) problems.push(`${at}: an upstream cannot fail over to itself`)
    else if (upstreams[target] === undefined) problems.push(`${at}: unknown upstream "${target}" (known: ${Object.keys(upstreams).join(', ')})`)
    else if (upstreams[target].failover !== undefined) problems.push(`${at}: "${target}" has a failover of its own ("${upstreams[target].failover as string}"); no failover chains (one hop only)`)
  }
}

/**
 * A failover nothing can engage: an upstream is unavailable when its circuit refuses or none of
 * its endpoints is usable, and one without a breaker and a health check, with a lone endpoint
 * (never ejected), is never either — its traffic would fail over only by hand.
 */
export function warnUnengagedFailover (upstreams: Readonly<Record<string, UpstreamConfig>>, breakers: Readonly<Record<string, unknown>>, warnings: string[]): void {
  for (const u of Object.values(upstreams)) {
    if (u.failover === null || breakers[u.name] !== undefined || u.healthCheck !== null || u.endpoints.length > 1) continue
    warnings.push(`upstreams.${u.name}.failover: ${u.name} has no circuit breaker (circuitBreakers.${u.name}), no healthCheck and one endpoint, so nothing makes it unavailable: its traffic never fails over to ${u.failover} on its own (only by hand, breakwater failover)`)
  }
}

/** Each entry an address or a CIDR (`10.0.0.0/8`, `::1`, `fd00::/8`); a malformed one is a problem. */
export function trustedProxies (list: readonly string[], at: string, problems: string[]): string[] {
  const out: string[] = []
  const check = new BlockList()
  list.forEach((entry, i) => {
    if (addTrusted(check, entry)) out.push(entry)
    else problems.push(`${at}.trustedProxies[${i}]: not an IP address or CIDR (got ${JSON.stringify(entry)})`)
  })
  return out
}

/** One block list for all of a listener's trusted proxies; null when there are none. */
export function trustedBlockList (entries: readonly string[]): BlockList | null {
  if (entries.length === 0) return null
  const list = new BlockList()
  for (const entry of entries) addTrusted(list, entry)
  return list
}

/** Add an address or CIDR to `list`; false when it is neither. */
function addTrusted (list: BlockList, entry: string): boolean {
  const slash = entry.indexOf('/')
  const address = slash === -1 ? entry : entry.slice(0, slash)
  const family = isIP(address)
  if (family === 0) return false
  const type = family === 4 ? 'ipv4' : 'ipv6'
  if (slash === -1) {
    list.addAddress(address, type)
    return true
  }
  const bits = entry.slice(slash + 1)
  if (!/^[0-9]{1,3}$/.test(bits) || Number(bits) > (family === 4 ? 32 : 128)) return false
  list.addSubnet(address, Number(bits), type)
  return true
}
