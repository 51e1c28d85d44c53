/**
 * The route table, compiled once per config: first match wins. A route matches on
 * `path` (exact) or `pathPrefix` (a string prefix, as Envoy's `prefix`), `methods`, `host`
 * (with or without the port) and `headers` (exact values). Matching runs on the normalised path.
 */
import type { IncomingMessage } from 'node:http'
import type { RouteConfig } from '../config/types.js'
import type { Upstream } from './upstreams.js'
import type { RouteStats } from './stats.js'
import { RetryBudget } from './retry-budget.js'

export class Route {
  readonly name: string
  readonly config: RouteConfig
  readonly upstream: Upstream
  readonly stats: RouteStats
  readonly retryBudget: RetryBudget | null
  private readonly methods: ReadonlySet<string> | null

  constructor (config: RouteConfig, upstream: Upstream, stats: RouteStats) {
    this.name = config.name
    this.config = config
    this.upstream = upstream
    this.stats = stats
    this.methods = config.match.methods === null ? null : new Set(config.match.methods)
    this.retryBudget = config.retries === null ? null : new RetryBudget(config.retries.budgetPercent, config.retries.minRetriesPerSecond)
  }

  /** `path` is the normalised path, possibly with its query. */
  matches (method: string, path: string, host: string, req: IncomingMessage): boolean {
    const m = this.config.match
    if (m.path !== null && !(path.startsWith(m.path) && (path.length === m.path.length || path.charCodeAt(m.path.length) === 63 /* ? */))) return false
    if (m.pathPrefix !== null && !path.startsWith(m.pathPrefix)) return false
    if (this.methods !== null && !this.methods.has(method)) return false
    if (m.host !== null && !hostMatches(m.host, host)) return false
    if (m.headers !== null) {
      for (const [name, value] of m.headers) if (req.headers[name] !== value) return false
    }
    return true
  }

  /** The path sent upstream: `rewritePrefix` replaces the matched `pathPrefix`. */
  upstreamPath (path: string): string {
    const rewrite = this.config.rewritePrefix
    if (rewrite === null) return path
    const rest = path.slice((this.config.match.pathPrefix as string).length)
    if (rest === '' || rest.charCodeAt(0) === 63 /* ? */) return rewrite + rest
    if (rewrite.endsWith('/') && rest.charCodeAt(0) === 47) return rewrite + rest.slice(1)
    if (!rewrite.endsWith('/') && rest.charCodeAt(0) !== 47) return `${rewrite}/${rest}`
    return rewrite + rest
  }
}

function hostMatches (want: string, host: string): boolean {
  const h = host.toLowerCase()
  if (h === want) return true
  // Compare without the port unless the configured host names one.
  const colon = h.lastIndexOf(':')
  return colon > 0 && h.indexOf(']') < colon && h.slice(0, colon) === want
}

export class RouteTable {
  readonly routes: readonly Route[]

  constructor (routes: Route[]) {
    this.routes = routes
  }

  match (method: string, path: string, host: string, req: IncomingMessage): Route | null {
    const routes = this.routes
    for (let i = 0; i < routes.length; i++) {
      const r = routes[i] as Route
      if (r.matches(method, path, host, req)) return r
    }
    return null
  }
}
