/**
 * Stage: rate limit (SPEC §17, shed). Token buckets per route, keyed by the route, the client
 * address, or a request header. A bucket holds up to `burst` tokens and refills at
 * `requestsPerSecond`, lazily: each request adds what the monotonic clock says has accrued
 * since the bucket was last touched, so there is no timer per bucket, or at all.
 *
 * - The key table is bounded: at most `maxKeys` buckets, the least recently used evicted (a
 *   `Map` in insertion order, a used key moved to the end). An evicted key comes back full:
 *   bounded memory is worth more than remembering an idle client.
 * - `client` is the peer address, or — when the listener has `trustedProxies` — the right-most
 *   `x-forwarded-for` entry that is not a trusted proxy (what the nearest untrusted hop said
 *   the client was; anything left of it the client could have written itself).
 * - `header:NAME` without that header (or with a value over 256 bytes) uses the client key and
 *   is counted: a client must not escape its limit by leaving a header out.
 * - A refusal is `429 rate_limited`, cause `breakwater`: shedding is never the app's error.
 *
 * The runtime mitigation (`breakwater mitigate rateLimit`) is an override per route
 * (`RateLimits.override`), kept across reloads until it is cleared.
 */
import type { IncomingMessage } from 'node:http'
import type { BlockList } from 'node:net'
import { isIP } from 'node:net'
import type { RateLimitConfig } from '../config/types.js'
import type { Route } from './route-table.js'

/** What the runtime mitigation sets: a rate and a burst. */
export interface RateLimitSettings {
  requestsPerSecond: number
  burst: number
}

/** Header values longer than this are not keys (memory per bucket stays bounded). */
const MAX_KEY_LENGTH = 256

/**
 * RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31. A rate so slow that
 * a token is due later than that (or never: 1e-30 per second) is sent as 2^31, whole digits,
 * never `1e+30` or `Infinity`, which a client cannot read as a number of seconds.
 */
const MAX_DELTA_SECONDS = 2 ** 31
/** RFC 8941 §3.3.1: a structured-field Integer has at most 15 digits (`q` of `RateLimit-Policy`). */
const MAX_SF_INTEGER = 999_999_999_999_999

interface Bucket {
  tokens: number
  /** `performance.now()` of the last refill. */
  at: number
}

export class RateLimiter {
  readonly config: RateLimitConfig
  /** The listener whose `trustedProxies` key its clients. */
  readonly listener: Route['listener']
  /** `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): quota `burst` per the seconds a full refill takes. */
  readonly policy: string
  /** The policy's name in `RateLimit`, as a structured-field string. */
  private readonly name: string
  private readonly perMs: number
  private readonly header: string | null
  private readonly trusted: TrustedProxies | null
  /** The `route` key's one bucket. */
  private readonly single: Bucket | null
  private readonly buckets = new Map<string, Bucket>()
  /** Requests keyed by the client because their `header:NAME` was missing. */
  keyFallbacks = 0
  evictions = 0

  constructor (routeName: string, config: RateLimitConfig, trusted: TrustedProxies | null, listener: Route['listener'] = 'proxy') {
    this.config = config
    this.listener = listener
    this.perMs = config.requestsPerSecond / 1000
    this.header = config.key.startsWith('header:') ? config.key.slice(7) : null
    this.trusted = trusted
    this.single = config.key === 'route' ? { tokens: config.burst, at: performance.now() } : null
    this.name = `"${routeName}"`
    this.policy = `${this.name};q=${Math.min(MAX_SF_INTEGER, config.burst)};w=${deltaSeconds(config.burst / config.requestsPerSecond)}`
  }

  /** Buckets held now (at most `maxKeys`). */
  get size (): number {
    return this.buckets.size
  }

  /**
   * Take a token for `req`. Returns 0 when it may go, else the seconds until a token is due
   * (for `retry-after`).
   */
  take (req: IncomingMessage, now: number): number {
    const bucket = this.single ?? this.bucket(this.keyOf(req), now)
    const { burst } = this.config
    let tokens = bucket.tokens + (now - bucket.at) * this.perMs
    if (tokens > burst) tokens = burst
    bucket.at = now
    if (tokens >= 1) {
      bucket.tokens = tokens - 1
      return 0
    }
    bucket.tokens = tokens
    return deltaSeconds((1 - tokens) / this.perMs / 1000)
  }

  /** The headers of a 429: `retry-after`, `RateLimit-Policy`, `RateLimit` (nothing remains; `t` = retry-after). */
  refusalHeaders (retryAfterSeconds: number): string[] {
    const t = String(retryAfterSeconds)
    return ['retry-after', t, 'ratelimit-policy', this.policy, 'ratelimit', `${this.name};r=0;t=${t}`]
  }

  private keyOf (req: IncomingMessage): string {
    if (this.header !== null) {
      const value = req.headers[this.header]
      const key = typeof value === 'string' ? value : Array.isArray(value) ? value.join(', ') : undefined
      if (key !== undefined && key.length <= MAX_KEY_LENGTH) return `h:${key}`
      this.keyFallbacks++
    }
    return clientAddress(req, this.trusted)
  }

  private bucket (key: string, now: number): Bucket {
    const buckets = this.buckets
    let bucket = buckets.get(key)
    if (bucket !== undefined) {
      // Least recently used first: a used key moves to the end.
      buckets.delete(key)
      buckets.set(key, bucket)
      return bucket
    }
    if (buckets.size >= this.config.maxKeys) {
      buckets.delete(buckets.keys().next().value as string)
      this.evictions++
    }
    bucket = { tokens: this.config.burst, at: now }
    buckets.set(key, bucket)
    return bucket
  }
}

/** `seconds` as a header's delta-seconds: whole, at least 1, at most 2^31. */
function deltaSeconds (seconds: number): number {
  return Math.min(MAX_DELTA_SECONDS, Math.max(1, Math.ceil(seconds)))
}

/**
 * The client's address: the peer, or behind trusted proxies the right-most `x-forwarded-for`
 * entry that is not one of them. An entry that is not an address stops the walk at the hop
 * that reported it (garbage is never a key a client could vary). IPv4-mapped IPv6 addresses
 * are written as IPv4, so one client has one key.
 */
export function clientAddress (req: IncomingMessage, trusted: TrustedProxies | null): string {
  let hop = canonical(req.socket.remoteAddress ?? '')
  if (trusted === null || hop === '' || !trusted.has(hop)) return hop
  const xff = req.headers['x-forwarded-for']
  if (xff === undefined) return hop
  const list = Array.isArray(xff) ? xff.join(',') : xff
  let end = list.length
  while (end > 0) {
    const comma = list.lastIndexOf(',', end - 1)
    const entry = canonical(stripPort(list.slice(comma + 1, end).trim()))
    end = comma === -1 ? 0 : comma
    if (entry === '') return hop
    hop = entry
    if (!trusted.has(entry)) return entry
  }
  return hop // every hop trusted: the left-most is the client
}

/**
 * Membership in a listener's trusted proxies, remembered: the same few proxy addresses are
 * asked about on every request, and a `BlockList` check costs far more than a `Map` lookup.
 * At most 4,096 answers are kept (then forgotten at once).
 */
export class TrustedProxies {
  private readonly memo = new Map<string, boolean>()

  constructor (private readonly list: BlockList) {}

  has (address: string): boolean {
    let trusted = this.memo.get(address)
    if (trusted === undefined) {
      trusted = this.list.check(address, address.includes(':') ? 'ipv6' : 'ipv4')
      if (this.memo.size >= 4096) this.memo.clear()
      this.memo.set(address, trusted)
    }
    return trusted
  }
}

/** `[::1]:8080` → `::1`, `10.0.0.1:8080` → `10.0.0.1`; an address as it is. */
function stripPort (entry: string): string {
  if (entry.startsWith('[')) {
    const close = entry.indexOf(']')
    return close === -1 ? '' : entry.slice(1, close)
  }
  const colon = entry.indexOf(':')
  return colon !== -1 && colon === entry.lastIndexOf(':') ? entry.slice(0, colon) : entry
}

/** A valid address in one spelling (lower case, IPv4-mapped as IPv4); '' when not an address. */
function canonical (address: string): string {
  const family = isIP(address)
  if (family === 4) return address
  if (family === 0) return ''
  const lower = address.toLowerCase()
  return lower.startsWith('::ffff:') && isIP(lower.slice(7)) === 4 ? lower.slice(7) : lower
}

/**
 * The limiters of the current routes, by route name: carried over a reload while a route's
 * effective settings are unchanged (its buckets keep their tokens), and the runtime overrides,
 * kept across reloads until cleared.
 */
export class RateLimits {
  private limiters = new Map<string, RateLimiter>()
  private readonly overrides = new Map<string, RateLimitSettings>()
  private routes: readonly Route[] = []

  /** `trusted`: each listener's trusted proxies, the data plane's (they change only at a restart). */
  constructor (private readonly trusted: Readonly<Record<Route['listener'], TrustedProxies | null>>) {}

  /** Give each route its limiter (or none); called for every new runtime. */
  attach (routes: readonly Route[]): void {
    this.routes = routes
    const next = new Map<string, RateLimiter>()
    for (const route of routes) {
      const effective = this.effective(route)
      if (effective === null) { route.rateLimiter = null; continue }
      const prev = this.limiters.get(route.name)
      // Buckets carry over only while the keying is unchanged: a route moved to the other
      // listener keys clients by that listener's trustedProxies, so it starts afresh.
      const limiter = prev !== undefined && prev.listener === route.listener && JSON.stringify(prev.config) === JSON.stringify(effective)
        ? prev
        : new RateLimiter(route.name, effective, this.trusted[route.listener], route.listener)
      route.rateLimiter = limiter
      next.set(route.name, limiter)
    }
    this.limiters = next
  }

  /**
   * Override a route's configured limit (`null` clears the override). The configured key and
   * `maxKeys` stay; a route without a `rateLimit` gets one bucket for the route. False for an
   * unknown route. Clearing always succeeds, also for a route a reload removed: its kept
   * override goes, or a reload that brings the route back would revive a lifted limit.
   */
  override (routeName: string, settings: RateLimitSettings | null): boolean {
    if (settings === null) this.overrides.delete(routeName)
    else if (!this.routes.some((r) => r.name === routeName)) return false
    else this.overrides.set(routeName, { requestsPerSecond: settings.requestsPerSecond, burst: settings.burst })
    this.attach(this.routes)
    return true
  }

  /** The active overrides, by route. */
  active (): ReadonlyMap<string, RateLimitSettings> {
    return this.overrides
  }

  private effective (route: Route): RateLimitConfig | null {
    const configured = route.config.rateLimit
    const override = this.overrides.get(route.name)
    if (override === undefined) return configured
    return { key: configured?.key ?? 'route', maxKeys: configured?.maxKeys ?? 100_000, ...override }
  }
}
