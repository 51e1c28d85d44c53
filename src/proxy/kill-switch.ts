/**
 * Stage: kill switch. A route whose `killSwitch` flag is off is refused with 503
 * `feature_disabled` without touching its upstream (SPEC §5). The check is one `Map.get` on
 * the flag snapshot (see flags/snapshot.ts for why it is not an OpenFeature call).
 */
import type { Route } from './route-table.js'

/** Reads flags synchronously; implemented by the flag snapshot. */
export interface FlagReader {
  enabled: (key: string) => boolean
}

/** True when the route may be served. */
export function killSwitchAllows (flags: FlagReader, route: Route): boolean {
  const key = route.config.killSwitch
  return key === null || flags.enabled(key)
}
