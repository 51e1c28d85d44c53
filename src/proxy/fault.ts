/**
 * Stage: fault injection for game days (Envoy's fault filter): per route, abort a share of
 * requests with a status, or delay a share of them. Off unless a route configures `fault`;
 * with `fault.flag` it is injected only while that flag is on, so a team switches it at run
 * time with the admin API or the flag file. Injected faults are marked: the
 * `x-breakwater-fault` header on the response, `breakwater_faults_injected_total{route,type}`,
 * and `fault` in the access log.
 */
import type { FaultConfig } from '../config/types.js'
import type { FlagReader } from './kill-switch.js'

export type FaultDecision = 0 | 1 | 2
export const NO_FAULT = 0
export const ABORT = 1
export const DELAY = 2

/** Decide, for one request, whether the route's fault applies. */
export function decideFault (fault: FaultConfig | null, flags: FlagReader, random: () => number = Math.random): FaultDecision {
  if (fault === null) return NO_FAULT
  if (fault.flag !== null && !flags.enabled(fault.flag)) return NO_FAULT
  if (fault.abortPercent > 0 && random() * 100 < fault.abortPercent) return ABORT
  if (fault.delayPercent > 0 && random() * 100 < fault.delayPercent) return DELAY
  return NO_FAULT
}
