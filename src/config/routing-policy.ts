/**
 * Checks of the routing policy (SPEC §15) that a schema cannot express: which listener a route
 * serves, and the configs in which a kill switch would not guard what its owner expects.
 */
import type { ResolvedInput } from './schema.js'
import type { RouteConfig } from './types.js'

export function checkRoutingPolicy (routes: readonly RouteConfig[], input: ResolvedInput, problems: string[], warnings: string[]): void {
  const hasEgressListener = input.listen?.egress !== undefined
  routes.forEach((r, i) => {
    if (r.listener === 'egress' && !hasEgressListener) {
      problems.push(`routes[${i}].listener: "egress" needs listen.egress (the listener the app sends its own outbound calls to)`)
    }
    if (r.match.strict && r.killSwitch !== null) {
      warnings.push(`routes[${i}].match.strict: the kill switch "${r.killSwitch}" guards only this exact spelling; other cases, ;parameters or a trailing slash reach the routes after it while the flag is off`)
    }
    for (let j = 0; j < i; j++) {
      const killed = routes[j] as RouteConfig
      if (killed.killSwitch !== null && killed.match.methods !== null && killed.listener === r.listener && coversMatch(killed, r) && !sameMethods(killed, r)) {
        warnings.push(`routes[${i}]: while flag "${killed.killSwitch}" is off, routes[${j}] refuses every method on its paths, including this route's requests (a killed route guards its path whatever the method)`)
        break
      }
    }
  })
  if (hasEgressListener && !routes.some((r) => r.listener === 'egress')) {
    warnings.push('listen.egress: no route has listener: egress, so every request on the egress listener is 404 no_route')
  }
  input.verification.synthetics.forEach((s, i) => {
    if (routes.some((r) => r.name === s.route && r.listener === 'egress')) {
      problems.push(`verification.synthetics[${i}].route: "${String(s.route)}" is an egress route; synthetic checks go through the proxy listener`)
    }
  })
}

/** True when every request `later` covers (path, host, headers) is also covered by `earlier`. */
function coversMatch (earlier: RouteConfig, later: RouteConfig): boolean {
  const a = earlier.match
  const b = later.match
  if (a.headers !== null || (a.host !== null && a.host !== b.host)) return false
  const bPath = b.path ?? b.pathPrefix
  if (bPath === null) return a.path === null && a.pathPrefix === null
  if (a.path !== null) return b.path !== null && bare(a.path.toLowerCase()) === bare(b.path.toLowerCase())
  if (a.pathPrefix === null) return true
  const prefix = a.pathPrefix.toLowerCase()
  return bPath.toLowerCase().startsWith(prefix) || bPath.toLowerCase() === bare(prefix)
}

/** Without one trailing slash, as non-strict matching reads it. */
function bare (path: string): string {
  return path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path
}

function sameMethods (a: RouteConfig, b: RouteConfig): boolean {
  const bm = b.match.methods
  return bm !== null && bm.every((m) => a.match.methods?.includes(m) === true)
}
