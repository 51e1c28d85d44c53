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
 * `Authorization` or `Cache-Control: no-store` on the request, without `Set-Cookie`,
 * `Cache-Control: no-store`, `private` or `no-cache` on the response, and without `Vary: *`.
 * A response that forbids being served stale (`must-revalidate`, `proxy-revalidate` or
 * `s-maxage`: RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10) is served only while it is still
 * fresh by its `s-maxage`, else its `max-age`, else its `Expires` minus its `Date` (RFC 9111
 * §4.2.1; its `Age` counted), and not stored without one. A request
 * that asks for a validated answer (`no-cache`, `max-age=0`, `Pragma: no-cache`: RFC 9111
 * §5.2.1) is not answered from the cache unless it also says `stale-if-error` (RFC 5861 §4); one
 * with `max-age=N` only with an entry at most N seconds old. A `Vary` response is stored with the
 * values of the request headers it names and served only to a request with the same values
 * (one variant per URL: the latest). The body is captured while it streams to the client
 * and given up the moment it passes `maxEntryBytes`, or when the bodies being captured at once
 * would pass `maxBytes`, so an uncached or oversized response costs nothing more than a length
 * check. Entries are evicted least recently used, and the
 * cache never holds more than `maxEntries` entries or `maxBytes` bytes (bodies, headers and
 * keys counted).
 *
 * Bodies are kept in one buffer of `maxBytes` the cache allocates at its first store, cut into
 * 4 KiB pages (a body takes whole pages, and is counted so). Separately allocated bodies sit in
 * malloc's heap among the traffic's short-lived buffers and keep the pages between them
 * resident after those are freed: under load that cost up to 8 MiB of RSS beyond the bodies
 * (bench/README.md). In the arena, what the bodies cost resident is at most `maxBytes`,
 * whatever the allocator does. A page goes back to the arena only when no answer is still
 * being written from it, so an entry evicted while a slow client reads it is never overwritten.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { FallbackCacheConfig, FallbackConfig } from '../config/types.js'
import type { ErrorCode } from './errors.js'
import type { RouteStats } from './stats.js'

/** The local codes a fallback may answer instead of (SPEC §17). */
export const DEGRADABLE: ReadonlySet<ErrorCode> = new Set<ErrorCode>(['circuit_open', 'feature_disabled', 'bulkhead_full', 'upstream_unavailable', 'upstream_timeout'])

/** `Cache-Control` directives that forbid a shared cache to store a response (RFC 9111 §5.2). */
const NO_STORE_OR_PRIVATE = /(?:^|[\s,])(?:no-store|private)(?:$|[\s,=])/i
const NO_STORE = /(?:^|[\s,])no-store(?:$|[\s,=])/i
/**
 * `Cache-Control` directives that forbid a shared cache to serve a response once stale (RFC 9111
 * §4.2.4): `no-cache` (stale at once: it must be validated before every use), `must-revalidate`,
 * and for a shared cache `proxy-revalidate` and `s-maxage`.
 */
const NO_CACHE = /(?:^|[\s,])no-cache(?:$|[\s,=])/i
const NO_STALE = /(?:^|[\s,])(?:must-revalidate|proxy-revalidate|s-maxage)(?:$|[\s,=])/i
const S_MAXAGE = /(?:^|[\s,])s-maxage\s*=\s*"?(\d{1,10})/i
const MAX_AGE = /(?:^|[\s,])max-age\s*=\s*"?(\d{1,10})/i
/** RFC 5861 §4 in a request: the client accepts a stale answer when the origin fails (optionally for at most N seconds past freshness). */
const STALE_IF_ERROR = /(?:^|[\s,])stale-if-error(?:\s*=\s*"?(\d{1,10}))?(?:$|[\s,"])/i

/** Bookkeeping bytes counted per entry besides its body, headers and key. */
const ENTRY_OVERHEAD = 200

/** The arena's page: a body takes whole pages. */
export const PAGE_BYTES = 4096

/** Where the cached bodies live: `maxBytes` cut into pages, allocated at the first store. */
class Arena {
  private buffer: Buffer | null = null
  /** Free page numbers, a stack; the lowest on top at first, so early bodies are contiguous. */
  private readonly free: number[] = []

  constructor (readonly pages: number) {
    for (let p = pages - 1; p >= 0; p--) this.free.push(p)
  }

  get freePages (): number {
    return this.free.length
  }

  /** Copy `chunks` (`length` bytes) into pages: the pages and views of their contiguous runs, or null when too few are free. */
  write (chunks: Buffer[], length: number): { pages: number[], views: Buffer[] } | null {
    const count = Math.ceil(length / PAGE_BYTES)
    if (count > this.free.length) return null
    const buffer = this.buffer ??= Buffer.allocUnsafeSlow(this.pages * PAGE_BYTES)
    const pages = this.free.splice(this.free.length - count).reverse()
    const views: Buffer[] = []
    let left = length
    for (let i = 0; i < pages.length;) {
      let j = i + 1
      while (j < pages.length && pages[j] === (pages[j - 1] as number) + 1) j++
      const start = (pages[i] as number) * PAGE_BYTES
      const bytes = Math.min(left, (j - i) * PAGE_BYTES)
      views.push(buffer.subarray(start, start + bytes))
      left -= bytes
      i = j
    }
    let view = 0
    let at = 0
    for (const c of chunks) {
      let from = 0
      while (from < c.length) {
        const v = views[view] as Buffer
        const n = c.copy(v, at, from)
        from += n
        at += n
        if (at === v.length) { view++; at = 0 }
      }
    }
    return { pages, views }
  }

  release (pages: number[]): void {
    for (let i = pages.length - 1; i >= 0; i--) this.free.push(pages[i] as number)
  }
}

interface Entry {
  key: string
  /** Response headers as sent to the client (hop-by-hop removed), without framing, `Age` and `x-request-id`. */
  headers: string[]
  /** The body: views of its runs of pages in the arena. */
  body: Buffer[]
  length: number
  pages: number[]
  /** Answers still being written from its pages; an evicted entry's pages are freed at 0. */
  readers: number
  evicted: boolean
  /** Lower-cased names of the request headers `Vary` lists, and their values when stored. */
  vary: string[]
  varyValues: string[]
  storedAt: number
  /** The upstream's own `Age` when stored, in seconds (RFC 9111 §4.2.3: the answer's age adds it). */
  initialAge: number
  /** The age in seconds from which it may not be served (it forbids stale answers); else Infinity. */
  freshSeconds: number
  /** Its freshness lifetime in seconds (RFC 9111 §4.2.1: `s-maxage`, else `max-age`; else 0). */
  lifetimeSeconds: number
  bytes: number
}

export class FallbackCache {
  readonly config: FallbackCacheConfig
  private readonly entries = new Map<string, Entry>()
  private readonly arena: Arena
  /** Bytes held now, evicted entries still being written included (always ≤ `maxBytes`). */
  bytes = 0
  /** Of those, the evicted entries' still being written. */
  private pinned = 0
  evictions = 0
  /**
   * Bytes of bodies being captured now, not stored yet: at most `maxBytes` too. A capture keeps
   * the chunks it was given, which would otherwise be freed once written to the client, so many
   * responses streaming at once must not each hold up to `maxEntryBytes`.
   */
  capturing = 0

  constructor (config: FallbackCacheConfig) {
    this.config = config
    this.arena = new Arena(Math.floor(config.maxBytes / PAGE_BYTES))
  }

  /** Arena pages not holding a body (for tests). */
  get freePages (): number {
    return this.arena.freePages
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
    // RFC 9111 §5.2.1.5: a request's no-store forbids storing the response to it as well.
    const asked = req.headers['cache-control']
    if (asked !== undefined && NO_STORE.test(asked)) return null
    let vary: string[] = []
    let cacheControl = ''
    let expires: string | null = null
    let date: string | null = null
    for (let i = 0; i < headers.length; i += 2) {
      const name = (headers[i] as string).toLowerCase()
      const value = headers[i + 1] as string
      if (name === 'set-cookie') return null
      if (name === 'cache-control') {
        if (NO_STORE_OR_PRIVATE.test(value)) return null
        cacheControl += `,${value}`
      }
      if (name === 'content-length' && Number(value) > this.config.maxEntryBytes) return null
      if (name === 'expires') expires ??= value
      if (name === 'date') date ??= value
      if (name === 'vary') {
        for (const v of value.split(',')) {
          const n = v.trim().toLowerCase()
          if (n === '*') return null
          if (n !== '') vary = [...vary, n]
        }
      }
    }
    const lifetimeSeconds = lifetime(cacheControl, expires, date)
    const freshSeconds = staleForbiddenAfter(cacheControl, lifetimeSeconds)
    if (freshSeconds === 0) return null
    return new Capture(this, key, headers, vary, vary.map((n) => headerValue(req, n)), freshSeconds, lifetimeSeconds)
  }

  /**
   * The stored response for `req`, if any, not older than `maxAgeMs`, and one the request itself
   * accepts (`acceptsStored`).
   */
  lookup (req: IncomingMessage, key: string, now: number, maxAgeMs: number): Entry | null {
    const entry = this.entries.get(key)
    if (entry === undefined || now - entry.storedAt > maxAgeMs) return null
    const age = ageOf(entry, now)
    if (age >= entry.freshSeconds || !acceptsStored(req, entry, age)) return null
    for (let i = 0; i < entry.vary.length; i++) {
      if (headerValue(req, entry.vary[i] as string) !== entry.varyValues[i]) return null
    }
    this.entries.delete(key) // most recently used last
    this.entries.set(key, entry)
    return entry
  }

  /**
   * Store a completed capture (`bytes` counted besides its body's pages), evicting the least
   * recently used entries to make room; not stored when evicted entries still being written
   * hold the room.
   */
  store (key: string, headers: string[], vary: string[], varyValues: string[], chunks: Buffer[], length: number, storedAt: number, initialAge: number, freshSeconds: number, lifetimeSeconds: number, bytes: number): void {
    const { maxBytes, maxEntries } = this.config
    if (initialAge >= freshSeconds) return // stale already, and it forbids stale answers
    bytes += Math.ceil(length / PAGE_BYTES) * PAGE_BYTES
    if (this.pinned + bytes > maxBytes) return // evicting every entry would not make room
    const prev = this.entries.get(key)
    if (prev !== undefined) this.evict(prev)
    while (this.entries.size > 0 && (this.bytes + bytes > maxBytes || this.entries.size >= maxEntries)) {
      this.evict(this.entries.values().next().value as Entry)
      this.evictions++
    }
    if (this.bytes + bytes > maxBytes) return
    // Pages are counted in bytes, so room in bytes is room in the arena.
    const written = this.arena.write(chunks, length)
    if (written === null) return
    this.entries.set(key, { key, headers, body: written.views, length, pages: written.pages, readers: 0, evicted: false, vary, varyValues, storedAt, initialAge, freshSeconds, lifetimeSeconds, bytes })
    this.bytes += bytes
  }

  /** An answer is being written from `entry`: its pages stay until `done`. */
  read (entry: Entry): () => void {
    entry.readers++
    let done = false
    return () => {
      if (done) return
      done = true
      if (--entry.readers === 0 && entry.evicted) {
        this.pinned -= entry.bytes
        this.free(entry)
      }
    }
  }

  private evict (entry: Entry): void {
    this.entries.delete(entry.key)
    entry.evicted = true
    if (entry.readers === 0) this.free(entry)
    else this.pinned += entry.bytes
  }

  private free (entry: Entry): void {
    this.arena.release(entry.pages)
    entry.pages = []
    this.bytes -= entry.bytes
  }
}

/**
 * A response body being teed into the cache, while it stays under `maxEntryBytes` and the bodies
 * being captured at once stay under `maxBytes`.
 */
export class Capture {
  private chunks: Buffer[] | null = []
  private length = 0

  constructor (
    private readonly cache: FallbackCache,
    private readonly key: string,
    private readonly headers: string[],
    private readonly vary: string[],
    private readonly varyValues: string[],
    private readonly freshSeconds: number,
    private readonly lifetimeSeconds: number
  ) {}

  add (chunk: Buffer): void {
    if (this.chunks === null) return
    const cache = this.cache
    if (this.length + chunk.length > cache.config.maxEntryBytes || cache.capturing + chunk.length > cache.config.maxBytes) { this.abandon(); return }
    this.length += chunk.length
    cache.capturing += chunk.length
    this.chunks.push(chunk)
  }

  /** Give the capture up (the response failed, was cut, or is too large): its chunks go. */
  abandon (): void {
    if (this.chunks === null) return
    this.chunks = null
    this.cache.capturing -= this.length
  }

  /** The response completed: store it (a copy into the arena, so no socket buffer is kept alive). */
  complete (now: number): void {
    const chunks = this.chunks
    if (chunks === null) return
    this.chunks = null
    this.cache.capturing -= this.length
    const headers: string[] = []
    let bytes = ENTRY_OVERHEAD + this.key.length
    let initialAge = 0
    for (let i = 0; i < this.headers.length; i += 2) {
      const name = (this.headers[i] as string).toLowerCase()
      if (name === 'age') initialAge = ageSeconds(this.headers[i + 1] as string)
      // Framing is the server's to set; Age is ours to compute; the request id is the one of the
      // request each stale answer answers (a stored one would name the request that fetched it).
      if (name === 'content-length' || name === 'age' || name === 'connection' || name === 'date' || name === 'x-request-id') continue
      headers.push(this.headers[i] as string, this.headers[i + 1] as string)
      bytes += (this.headers[i] as string).length + (this.headers[i + 1] as string).length
    }
    for (const v of this.varyValues) bytes += v.length
    this.cache.store(this.key, headers, this.vary, this.varyValues, chunks, this.length, now, initialAge, this.freshSeconds, this.lifetimeSeconds, bytes)
  }
}

/**
 * From what age (seconds) a response whose `Cache-Control` is `value` may no longer be served:
 * 0 for `no-cache`; its freshness lifetime (`lifetimeSeconds`) when it forbids stale answers;
 * Infinity otherwise (then only the route's `staleIfError` bounds it, RFC 5861 §4).
 */
function staleForbiddenAfter (value: string, lifetimeSeconds: number): number {
  if (NO_CACHE.test(value)) return 0
  return NO_STALE.test(value) ? lifetimeSeconds : Infinity
}

/**
 * A response's freshness lifetime in seconds (RFC 9111 §4.2.1): its `s-maxage`, else its
 * `max-age`, else its `Expires` minus its `Date` (the time it is stored when it has no valid
 * `Date`); 0 when it gives none, or an `Expires` that is not a date ("0" included, §5.3).
 */
function lifetime (cacheControl: string, expires: string | null, date: string | null): number {
  const limit = S_MAXAGE.exec(cacheControl) ?? MAX_AGE.exec(cacheControl)
  if (limit !== null) return Number(limit[1])
  if (expires === null) return 0
  const expiresAt = Date.parse(expires)
  if (Number.isNaN(expiresAt)) return 0
  const dated = date === null ? NaN : Date.parse(date)
  return Math.max(0, Math.floor((expiresAt - (Number.isNaN(dated) ? Date.now() : dated)) / 1000))
}

/**
 * Whether `req` lets a stored response of `age` seconds answer it. A request with `no-cache`, or
 * `Pragma: no-cache` and no `Cache-Control` (RFC 9111 §5.2.1.4, §5.4), or `max-age=0`, wants
 * only an answer validated at the origin; `max-age=N`, none older than N seconds (§5.2.1.1).
 * `stale-if-error` (RFC 5861 §4) overrides them: the client accepts a stale answer when the
 * origin fails, for at most its N seconds past the response's freshness lifetime.
 */
function acceptsStored (req: IncomingMessage, entry: Entry, age: number): boolean {
  const asked = req.headers['cache-control']
  if (asked === undefined) {
    const pragma = req.headers.pragma
    return pragma === undefined || !NO_CACHE.test(pragma)
  }
  const staleIfError = STALE_IF_ERROR.exec(asked)
  if (staleIfError !== null) return staleIfError[1] === undefined || age - entry.lifetimeSeconds <= Number(staleIfError[1])
  if (NO_CACHE.test(asked)) return false
  const maxAge = MAX_AGE.exec(asked)
  return maxAge === null || (Number(maxAge[1]) > 0 && age <= Number(maxAge[1]))
}

/** An entry's age at `now` in seconds, the upstream's `Age` included (RFC 9111 §4.2.3). */
function ageOf (entry: Entry, now: number): number {
  return entry.initialAge + Math.floor((now - entry.storedAt) / 1000)
}

/** An `Age` value in seconds (RFC 9111 §5.1: delta-seconds); 0 when it is not one. */
function ageSeconds (value: string): number {
  return /^\d{1,10}$/.test(value.trim()) ? Number(value.trim()) : 0
}

function headerValue (req: IncomingMessage, name: string): string {
  const v = req.headers[name]
  return v === undefined ? '' : Array.isArray(v) ? v.join(', ') : v
}

/** A route's fallback: its cache (if stale answers are on) and its static response. */
export class Fallback {
  readonly config: FallbackConfig
  readonly cache: FallbackCache | null
  /**
   * The static response's headers besides its framing: the configured ones, and `Cache-Control:
   * no-store` unless they set their own. A stand-in for the route must not be kept by a cache
   * in front (a CDN, a browser) and served in place of the real page once the route is back.
   */
  private readonly staticHeaders: string[]

  constructor (config: FallbackConfig, cache: FallbackCache | null) {
    this.config = config
    this.cache = cache
    const configured = config.static?.headers ?? []
    this.staticHeaders = configured.flat()
    if (!configured.some(([name]) => name === 'cache-control')) this.staticHeaders.push('cache-control', 'no-store')
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
        const head = [...entry.headers, 'age', String(ageOf(entry, now)), 'content-length', String(entry.length), 'x-breakwater-fallback', 'stale', 'x-request-id', requestId]
        if (close) head.push('connection', 'close')
        res.writeHead(200, head)
        if (method === 'HEAD' || entry.length === 0) res.end()
        else {
          // The pages stay the entry's until the answer is written out or given up.
          res.once('close', cache.read(entry))
          const last = entry.body.length - 1
          for (let i = 0; i < last; i++) res.write(entry.body[i])
          res.end(entry.body[last])
        }
        stats.fallbacks.stale++
        return 'stale'
      }
    }
    const s = this.config.static
    if (s === null) return null
    const head = ['content-type', s.contentType, 'content-length', String(s.body.length), 'x-breakwater-fallback', 'static', 'x-request-id', requestId]
    for (let i = 0; i < this.staticHeaders.length; i++) head.push(this.staticHeaders[i] as string)
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
