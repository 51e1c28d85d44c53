/**
 * Stage: fallback (SPEC §17, degrade). When a route would answer `circuit_open`,
 * `feature_disabled`, `bulkhead_full`, `upstream_unavailable` or `upstream_timeout`, it answers
 * instead with the last good `200` for the same request (stale-if-error, RFC 5861 §4), marked
 * `x-breakwater-fallback: stale` with its `Age`, or else with the route's static response,
 * marked `x-breakwater-fallback: static`.
 *
 * A degraded answer is a success for the user, never for the breaker or the triggers: the
 * request's cause stays what the refusal would have made it (context.ts), so an outage served
 * from the cache still opens the circuit, keeps it open, and fires its trigger.
 *
 * What is stored (RFC 9111 §3, for a shared cache): a `200` to a `GET`, without
 * `Authorization` on the request, without `Set-Cookie`, `Cache-Control: no-store` or
 * `private` on the response, and without `Vary: *`. A `Vary` response is stored with the
 * values of the request headers it names and served only to a request with the same values
 * (one variant per URL: the latest). The body is captured while it streams to the client
 * and given up the moment it passes `maxEntryBytes`, so an uncached or oversized response
 * costs nothing more than a length check. Entries are evicted least recently used, and the
 * cache never holds more than `maxEntries` entries or `maxBytes` bytes (bodies, headers and
 * keys counted).
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { FallbackCacheConfig, FallbackConfig } from '../config/types.js'
import type { ErrorCode } from './errors.js'
import type { RouteStats } from './stats.js'

/** The local codes a fallback may answer instead of (SPEC §17). */
export const DEGRADABLE: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['circuit_open', 'feature_disabled', 'bulkhead_full', 'upstream_unavailable', 'upstream_timeout'])

/** Bookkeeping bytes counted per entry besides its body, headers and key. */
const ENTRY_OVERHEAD = 200

interface Entry {
  key: string
  /** Response headers as sent to the client (hop-by-hop removed), without framing and `Age`. */
  headers: string[]
  body: Buffer
  /** Lower-cased names of the request headers `Vary` lists, and their values when stored. */
  vary: string[]
  varyValues: string[]
  storedAt: number
  bytes: number
}

export class FallbackCache {
  readonly config: FallbackCacheConfig
  private readonly entries = new Map<string, Entry>()
  /** Bytes held now (always ≤ `maxBytes`). */
  bytes = 0
  evictions = 0

  constructor (config: FallbackCacheConfig) {
    this.config = config
  }

  get size (): number {
    return this.entries.size
  }

  /**
   * Start capturing a response to `req` whose head is `status` and `headers` (as sent to the
   * client), or null when it may not be stored.
   */
  capture (req: IncomingMessage, key: string, status: number, headers: string[]): Capture | null {
    if (status !== 200 || req.method !== 'GET' || req.headers.authorization !== undefined) return null
    let vary: string[] = []
    for (let i = 0; i < headers.length; i += 2) {
      const name = (headers[i] as string).toLowerCase()
      const value = headers[i + 1] as string
      if (name === 'set-cookie') return null
      if (name === 'cache-control' && /(?:^|[\s,])(?:no-store|private)(?:$|[\s,=])/i.test(value)) return null
      if (name === 'content-length' && Number(value) > this.config.maxEntryBytes) return null
      if (name === 'vary') {
        for (const v of value.split(',')) {
          const n = v.trim().toLowerCase()
          if (n === '*') return null
          if (n !== '') vary = [...vary, n]
        }
      }
    }
    return new Capture(this, key, headers, vary, vary.map((n) => headerValue(req, n)))
  }

  /** The stored response for `req`, if any and not older than `maxAgeMs`. */
  lookup (req: IncomingMessage, key: string, now: number, maxAgeMs: number): Entry | null {
    const entry = this.entries.get(key)
    if (entry === undefined || now - entry.storedAt > maxAgeMs) return null
    for (let i = 0; i < entry.vary.length; i++) {
      if (headerValue(req, entry.vary[i] as string) !== entry.varyValues[i]) return null
    }
    this.entries.delete(key) // most recently used last
    this.entries.set(key, entry)
    return entry
  }

  /** Store a completed capture, evicting the least recently used entries to make room. */
  store (entry: Entry): void {
    const { maxBytes, maxEntries } = this.config
    if (entry.bytes > maxBytes) return
    const prev = this.entries.get(entry.key)
    if (prev !== undefined) {
      this.entries.delete(entry.key)
      this.bytes -= prev.bytes
    }
    while (this.entries.size > 0 && (this.bytes + entry.bytes > maxBytes || this.entries.size >= maxEntries)) {
      const oldest = this.entries.values().next().value as Entry
      this.entries.delete(oldest.key)
      this.bytes -= oldest.bytes
      this.evictions++
    }
    this.entries.set(entry.key, entry)
    this.bytes += entry.bytes
  }
}

/** A response body being teed into the cache, while it stays under `maxEntryBytes`. */
export class Capture {
  private chunks: Buffer[] | null = []
  private length = 0

  constructor (
    private readonly cache: FallbackCache,
    private readonly key: string,
    private readonly headers: string[],
    private readonly vary: string[],
    private readonly varyValues: string[]
  ) {}

  add (chunk: Buffer): void {
    if (this.chunks === null) return
    this.length += chunk.length
    if (this.length > this.cache.config.maxEntryBytes) { this.chunks = null; return }
    this.chunks.push(chunk)
  }

  /** The response completed: store it (a copy, so no socket buffer is kept alive). */
  complete (now: number): void {
    const chunks = this.chunks
    if (chunks === null) return
    this.chunks = null
    const body = Buffer.allocUnsafeSlow(this.length)
    let at = 0
    for (const c of chunks) at += c.copy(body, at)
    const headers: string[] = []
    let bytes = ENTRY_OVERHEAD + this.key.length + body.length
    for (let i = 0; i < this.headers.length; i += 2) {
      const name = (this.headers[i] as string).toLowerCase()
      // Framing is the server's to set; Age is ours to compute.
      if (name === 'content-length' || name === 'age' || name === 'connection' || name === 'date') continue
      headers.push(this.headers[i] as string, this.headers[i + 1] as string)
      bytes += (this.headers[i] as string).length + (this.headers[i + 1] as string).length
    }
    for (const v of this.varyValues) bytes += v.length
    this.cache.store({ key: this.key, headers, body, vary: this.vary, varyValues: this.varyValues, storedAt: now, bytes })
  }
}

function headerValue (req: IncomingMessage, name: string): string {
  const v = req.headers[name]
  return v === undefined ? '' : Array.isArray(v) ? v.join(', ') : v
}

/** A route's fallback: its cache (if stale answers are on) and its static response. */
export class Fallback {
  readonly config: FallbackConfig
  readonly cache: FallbackCache | null

  constructor (config: FallbackConfig, cache: FallbackCache | null) {
    this.config = config
    this.cache = cache
  }

  /**
   * Answer `req` on `res` instead of a refusal: the stale entry, else the static response.
   * Returns which it sent and counts it in `stats`; null when there is nothing to answer with.
   */
  serve (req: IncomingMessage, res: ServerResponse, key: string, requestId: string, close: boolean, stats: RouteStats): 'stale' | 'static' | null {
    const method = req.method
    const cache = this.cache
    if (cache !== null && (method === 'GET' || method === 'HEAD')) {
      const now = Date.now()
      const entry = cache.lookup(req, key, now, this.config.staleIfErrorMs)
      if (entry !== null) {
        const head = [...entry.headers, 'age', String(Math.floor((now - entry.storedAt) / 1000)), 'content-length', String(entry.body.length), 'x-breakwater-fallback', 'stale', 'x-request-id', requestId]
        if (close) head.push('connection', 'close')
        res.writeHead(200, head)
        res.end(method === 'HEAD' ? undefined : entry.body)
        stats.fallbacks.stale++
        return 'stale'
      }
    }
    const s = this.config.static
    if (s === null) return null
    const head = ['content-type', s.contentType, 'content-length', String(s.body.length), 'x-breakwater-fallback', 'static', 'x-request-id', requestId]
    for (const [name, value] of s.headers) head.push(name, value)
    if (close) head.push('connection', 'close')
    res.writeHead(s.status, head)
    res.end(method === 'HEAD' ? undefined : s.body)
    stats.fallbacks.static++
    return 'static'
  }
}

/** Fallbacks by route name, carried across reloads while a route's fallback is unchanged (the cache stays warm). */
export class Fallbacks {
  private byRoute = new Map<string, Fallback>()

  attach (routes: ReadonlyArray<{ name: string, config: { fallback: FallbackConfig | null }, fallback: Fallback | null }>): void {
    const next = new Map<string, Fallback>()
    for (const route of routes) {
      const config = route.config.fallback
      if (config === null) { route.fallback = null; continue }
      const prev = this.byRoute.get(route.name)
      const same = prev !== undefined && JSON.stringify(prev.config) === JSON.stringify(config)
      const fallback = same ? prev : new Fallback(config, config.cache === null ? null : new FallbackCache(config.cache))
      route.fallback = fallback
      next.set(route.name, fallback)
    }
    this.byRoute = next
  }
}
