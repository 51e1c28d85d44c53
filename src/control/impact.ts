/**
 * An incident's impact, counted as it happens (SPEC §19): the trigger windows are in memory
 * and hold about two minutes at second resolution, so the incident's figures are added up from
 * them every few seconds while it is open and kept in its record (in `stateDir`), which is what
 * the post-mortem draft reads — after a restart too.
 *
 * Only what the windows hold is counted: requests of the incident's routes whose outcome the
 * trigger windows record (SPEC §15: upstream failures, and refusals of a circuit that opened on
 * failures; never a kill switch's or a forced circuit's refusals), which never hold the
 * verifier's own probes. A span the sidecar held no figures for (it was restarted) is listed
 * as a gap, never filled in.
 */
import type { RouteStats } from '../proxy/stats.js'
import { emptySums, wallMsOf } from '../proxy/window.js'

export interface Impact {
  /** The first and last second counted (ISO). */
  from: string
  to: string
  /** Requests in scope, and those that failed. */
  requests: number
  failed: number
  /** The highest error rate of one whole second with at least PEAK_MIN_REQUESTS requests. */
  peakErrorRate: number | null
  peakAt: string | null
  /** The verifier's probes left out of the figures above. */
  probesExcluded: number
  /** Spans of the incident with no figures, and why. */
  gaps: Array<{ from: string, to: string, why: string }>
  /** The next second to count (epoch seconds on the window clock, window.ts). */
  countedUntil: number
}

/** Seconds with fewer requests than this are too thin for a peak error rate. */
export const PEAK_MIN_REQUESTS = 5
/** Seconds younger than this are read at second resolution (the seconds ring holds 128). */
const SECONDS_HELD = 120

export function emptyImpact (fromSec: number): Impact {
  return { from: iso(fromSec), to: iso(fromSec), requests: 0, failed: 0, peakErrorRate: null, peakAt: null, probesExcluded: 0, gaps: [], countedUntil: fromSec }
}

/**
 * Add the whole seconds [impact.countedUntil, toSec) of the `routes` windows into `impact`.
 * `heldSince`: the first second this process holds (its start); `probes(second)`: the
 * verifier's probes the windows left out in that second.
 */
export function countImpact (impact: Impact, stats: Iterable<RouteStats>, routes: ReadonlySet<string>, toSec: number, heldSince: number, probes: (second: number) => number): void {
  if (toSec <= impact.countedUntil) return
  if (impact.countedUntil < heldSince) {
    const gapTo = Math.min(heldSince, toSec)
    impact.gaps.push({ from: iso(impact.countedUntil), to: iso(gapTo), why: 'the sidecar was restarted: the traffic of this span was held by the previous process and is not known' })
    impact.countedUntil = gapTo
    if (toSec <= gapTo) return
  }
  const scoped = [...stats].filter((s) => routes.has(s.route))
  const from = impact.countedUntil
  const total = emptySums(false)
  for (const s of scoped) s.window.sum(from, toSec, total)
  let probesExcluded = 0
  for (let second = Math.max(from, toSec - SECONDS_HELD); second < toSec; second++) {
    probesExcluded += probes(second)
    const one = emptySums(false)
    for (const s of scoped) s.window.sum(second, second + 1, one)
    if (one.requests < PEAK_MIN_REQUESTS) continue
    const rate = one.errors / one.requests
    if (impact.peakErrorRate === null || rate > impact.peakErrorRate) {
      impact.peakErrorRate = Math.round(rate * 1e4) / 1e4
      impact.peakAt = iso(second)
    }
  }
  impact.requests += total.requests
  impact.failed += total.errors
  impact.probesExcluded += probesExcluded
  impact.countedUntil = toSec
  impact.to = iso(toSec)
}

/** A window second as the wall clock reads it: what people read. */
function iso (second: number): string {
  return new Date(wallMsOf(second * 1000)).toISOString()
}
