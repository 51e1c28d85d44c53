/**
 * The route table, compiled once per config: first match wins. A route matches on
 * `path` (exact) or `pathPrefix` (a string prefix, as Envoy's `prefix`), `methods`, `host`
 * (with or without the port) and `headers` (exact values), and only on its `listener`.
 *
 * Routing policy (SPEC §15), decided here and nowhere else:
 * - Matching runs on the normalised path (path.ts). By default it also ignores ASCII case, `;`
 *   segment parameters and one trailing slash (`matchKey`), because the app behind us may:
 *   a kill switch must cover every spelling the app treats as its path. `match.strict: true`
 *   compares the normalised path as spelled.
 * - Ingress and egress are separate: the proxy port never reaches a `listener: egress` route,
 *   whatever its Host header, and the egress port reaches nothing else.
 * - A killed route guards its path for every method: a request that only its `methods` keep
 *   out of the route would otherwise fall through to a broader route (the usual catch-all `/`)
 *   and reach the killed feature. So matching falls through a route on its method only while
 *   the route is live; while killed, it claims the request and the kill switch stage refuses it.
 *   In the same way a killed non-strict route claims its path spelled with encoded slashes
 *   (`/checkout%2Fcart` for `pathPrefix: /checkout/`, `slashAlias`), which an app that decodes
 *   the path before routing reads as the killed path; a live route leaves it to the others.
 *   And a killed route with a `host` claims a request without one (HTTP/1.0 needs no Host, and
 *   `Host:` may be empty) on its path: the app answers that as its default virtual host, which
 *   may be the killed one. A live route leaves it to the others, as before.
 */
import type { IncomingMessage } from 'node:http'
import type { Listener, RouteConfig } from '../config/types.js'
import type { Upstream } from './upstreams.js'
import type { RequestHead } from './headers.js'
import type { RouteStats } from './stats.js'
import { RetryBudget } from './retry-budget.js'
import type { RateLimiter } from './rate-limit.js'
import type { Fallback } from './fallback.js'
import { killSwitchAllows, type FlagReader } from './kill-switch.js'
import { matchKey, slashAlias, foldCase, withoutSegmentParameters } from './path.js'

export class Route {
  readonly name: string
  readonly config: RouteConfig
  readonly upstream: Upstream
  readonly stats: RouteStats
  readonly retryBudget: RetryBudget | null
  readonly listener: Listener
  /** Its token buckets (SPEC §17), set for each runtime; null = not limited. */
  rateLimiter: RateLimiter | null = null
  /** Its degraded answers (SPEC §17), set for each runtime; null = none. */
  fallback: Fallback | null = null
  private readonly methods: ReadonlySet<string> | null
  /** Non-strict routes: `match.path` as a match key. */
  private readonly pathKey: string | null
  /** Non-strict routes: `match.pathPrefix` case-folded, and without its trailing slash (`/pay/` also covers `/pay`). */
  private readonly prefixKey: string | null
  private readonly prefixBare: string | null
  /**
   * `match.host` still ends its name with a dot (it was written with two): such a host is also
   * matched as spelled, which `hostKey` (one final dot dropped) would not find.
   */
  private readonly hostDotted: boolean

  constructor (config: RouteConfig, upstream: Upstream, stats: RouteStats) {
    this.name = config.name
    this.config = config
    this.upstream = upstream
    this.stats = stats
    this.listener = config.listener
    this.methods = config.match.methods === null ? null : new Set(config.match.methods)
    this.retryBudget = config.retries === null ? null : new RetryBudget(config.retries.budgetPercent, config.retries.minRetriesPerSecond)
    const { path, pathPrefix, strict } = config.match
    this.pathKey = strict || path === null ? null : matchKey(path)
    this.prefixKey = strict || pathPrefix === null ? null : foldCase(pathPrefix)
    this.prefixBare = this.prefixKey !== null && this.prefixKey.length > 1 && this.prefixKey.endsWith('/') ? this.prefixKey.slice(0, -1) : null
    const host = config.match.host
    this.hostDotted = host !== null && hostKey(host) !== host
  }

  /**
   * Everything but the method: `path` is the normalised path (possibly with its query), `key`
   * its `matchKey`; `head` null asks whether it covers the request whatever its host.
   */
  covers (path: string, key: string, head: RequestHead | null, req: IncomingMessage): boolean {
    const m = this.config.match
    if (m.strict) {
      if (m.path !== null && !(path.startsWith(m.path) && (path.length === m.path.length || path.charCodeAt(m.path.length) === 63 /* ? */))) return false
      if (m.pathPrefix !== null && !path.startsWith(m.pathPrefix)) return false
    } else {
      if (this.pathKey !== null && key !== this.pathKey) return false
      if (this.prefixKey !== null && !key.startsWith(this.prefixKey) && key !== this.prefixBare) return false
    }
    if (m.host !== null && head !== null && !hostMatches(m.host, requestHostKey(head)) && !(this.hostDotted && head.host.toLowerCase() === m.host)) return false
    if (m.headers !== null) {
      for (const [name, value] of m.headers) if (req.headers[name] !== value) return false
    }
    return true
  }

  allowsMethod (method: string): boolean {
    return this.methods === null || this.methods.has(method)
  }

  /** The path sent upstream: `rewritePrefix` replaces the matched `pathPrefix`. */
  upstreamPath (path: string): string {
    const rewrite = this.config.rewritePrefix
    if (rewrite === null) return path
    const prefix = this.config.match.pathPrefix as string
    const q = path.indexOf('?')
    let p = q === -1 ? path : path.slice(0, q)
    // A route that matched only once `;` parameters were removed (`/api;v=1/x`, `/x/..;/api/x`)
    // rewrites that path: cutting the prefix's length off the spelling would cut the wrong part.
    if (this.prefixKey !== null && foldCase(p.slice(0, prefix.length)) !== this.prefixKey && foldCase(p) !== this.prefixBare) p = withoutSegmentParameters(p)
    const rest = p.slice(Math.min(prefix.length, p.length)) + (q === -1 ? '' : path.slice(q))
    if (rest === '' || rest.charCodeAt(0) === 63 /* ? */) return rewrite + rest
    if (rewrite.endsWith('/') && rest.charCodeAt(0) === 47) return rewrite + rest.slice(1)
    if (!rewrite.endsWith('/') && rest.charCodeAt(0) !== 47) return `${rewrite}/${rest}`
    return rewrite + rest
  }
}

/**
 * A route's host (lower case, without a final dot) against the request's Host as routes read
 * it (`hostKey`): ASCII case aside, the port aside unless the route names one, and a final dot
 * aside. `pay.local.` is the fully qualified spelling of `pay.local`, which DNS and the app take
 * as the same name: a route (and its kill switch) cannot be missed by it.
 */
function hostMatches (want: string, key: string): boolean {
  if (key === want) return true
  const colon = portAt(key)
  return colon === want.length && key.startsWith(want)
}

/**
 * A Host as routes read it: lower case, without a final dot on its name (`Shop.Example.:8080`
 * is `shop.example:8080`). The fallback cache keys on it, so one page is one entry however the
 * client spells its host.
 */
export function hostKey (host: string): string {
  const h = host.toLowerCase()
  const colon = portAt(h)
  if (colon === -1) return withoutFinalDot(h)
  return colon > 1 && h.charCodeAt(colon - 1) === 46 /* . */ ? h.slice(0, colon - 1) + h.slice(colon) : h
}

/** The request's Host as routes read it (`hostKey`), worked out once per request. */
export function requestHostKey (head: RequestHead): string {
  return head.hostKey ??= hostKey(head.host)
}

/** A host key's name without its port (`shop.example:8080` → `shop.example`). */
export function hostName (key: string): string {
  const colon = portAt(key)
  return colon === -1 ? key : key.slice(0, colon)
}

/** Where a Host's port starts (its `:`), or -1: an IPv6 literal's colons are inside its brackets. */
function portAt (host: string): number {
  const colon = host.lastIndexOf(':')
  return colon > 0 && host.indexOf(']') < colon ? colon : -1
}

function withoutFinalDot (name: string): string {
  return name.length > 1 && name.charCodeAt(name.length - 1) === 46 /* . */ ? name.slice(0, -1) : name
}

export class RouteTable {
  readonly routes: readonly Route[]
  private readonly flags: FlagReader

  constructor (routes: Route[], flags: FlagReader) {
    this.routes = routes
    this.flags = flags
  }

  /** The route for a request on `listener`; `path` is the normalised path, possibly with its query. */
  match (method: string, path: string, head: RequestHead, req: IncomingMessage, listener: Listener): Route | null {
    const key = matchKey(path)
    const alias = slashAlias(key)
    const routes = this.routes
    for (let i = 0; i < routes.length; i++) {
      const r = routes[i] as Route
      if (r.listener !== listener) continue
      if (r.covers(path, key, head, req)) {
        if (r.allowsMethod(method) || !killSwitchAllows(this.flags, r, method, path, head)) return r
      } else if (alias !== null && !r.config.match.strict && r.covers(path, alias, head, req) && !killSwitchAllows(this.flags, r, method, path, head)) {
        return r
      } else if (head.host === '' && r.config.match.host !== null && r.covers(path, key, null, req) && !killSwitchAllows(this.flags, r, method, path, head)) {
        return r
      }
    }
    return null
  }
}
