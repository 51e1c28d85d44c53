/**
 * Stage: kill switch. A route whose `killSwitch` flag is off is refused with 503
 * `feature_disabled` without touching its upstream (SPEC §5). For a plain flag the check is one
 * `Map.get` on the flag snapshot (see flags/snapshot.ts for why it is not an OpenFeature call);
 * only a flag with flagd targeting is evaluated for the request (flags/targeting.ts, SPEC §16).
 */
import type { Route } from './route-table.js'
import type { RequestHead } from './headers.js'
import { matchKey, slashAlias } from './path.js'

/** A flag whose value depends on the request (flagd targeting). */
export interface TargetingRule {
  enabledFor: (method: string, path: string, head: RequestHead) => boolean
}

/** Reads flags synchronously; implemented by the flag snapshot. */
export interface FlagReader {
  enabled: (key: string) => boolean
  /** Flags with targeting, by key; null when no flag has any (the common case: one null check). */
  readonly targeted: ReadonlyMap<string, TargetingRule> | null
}

/**
 * True when the route may serve this request. `path` is the normalised path (possibly with its
 * query).
 */
export function killSwitchAllows (flags: FlagReader, route: Route, method: string, path: string, head: RequestHead): boolean {
  const key = route.config.killSwitch
  if (key === null) return true
  const targeted = flags.targeted
  if (targeted !== null) {
    const rule = targeted.get(key)
    if (rule !== undefined) {
      const spelled = targetingPath(route, path)
      if (!rule.enabledFor(method, spelled, head)) return false
      // Killed for the path with encoded slashes read as `/` is killed (route-table.ts).
      const alias = route.config.match.strict ? null : slashAlias(spelled)
      return alias === null || rule.enabledFor(method, alias, head)
    }
  }
  return flags.enabled(key)
}

/**
 * The path a targeting rule sees: the one the route matched on. For a non-strict route that is
 * its match key (lower case, no `;` parameters, no trailing slash — SPEC §15), so a rule on
 * `/checkout/v2` also covers `/Checkout/V2/`, as the route does; a strict route sees the
 * normalised path as spelled. Never the query.
 */
function targetingPath (route: Route, path: string): string {
  if (!route.config.match.strict) return matchKey(path)
  const q = path.indexOf('?')
  return q === -1 ? path : path.slice(0, q)
}
