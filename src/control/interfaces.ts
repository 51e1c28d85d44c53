/**
 * What the control plane may see and change of the data plane (STYLE: `control/` acts on the
 * data plane only through small interfaces), and the shapes its callers pass in.
 */
import type { CircuitState, ForcedState } from '../proxy/circuit-breaker.js'
import type { FlagOrigin } from '../flags/sources.js'
import type { FleetEntry, FleetState } from '../state/state-file.js'

/** What the control plane may change in the flags. */
export interface FlagControl {
  /** Resolves once the request path sees the change; the change itself is made synchronously. */
  override: (key: string, enabled: boolean | null) => Promise<void>
  defines: (key: string) => boolean
  readonly values: ReadonlyMap<string, boolean>
  origin: (key: string) => FlagOrigin | null
}

/** What the control plane may see and change of the circuits. */
export interface CircuitView {
  upstream: string
  state: CircuitState
  automaticState: CircuitState
  forced: ForcedState
  automatic: boolean
  failureRate: number
  windowRequests: number
}

export interface CircuitControl {
  force: (upstream: string, state: ForcedState) => boolean
  circuits: () => CircuitView[]
  upstreams: () => string[]
  /** Flags used as kill switches by routes. */
  killSwitchFlags: () => string[]
}

/** A refusal with its HTTP status and code, for the admin API. */
export class ControlError extends Error {
  constructor (readonly status: number, readonly code: string, message: string, readonly details: Record<string, unknown> = {}) {
    super(message)
  }
}

export interface Actor {
  reason: string
  /** The caller's address, or `trigger:<name>`. */
  requester: string
  /** `operator` or `trigger:<name>`. */
  source: string
}

export interface MitigationRequest extends Actor {
  action: string
  flags?: string[]
  upstreams?: string[]
  /** The trigger's name, for rollbacks fired by one. */
  trigger?: string | null
  /** failover: where the traffic goes (default: each upstream's configured failover). */
  to?: string | null
  /** rateLimit: the routes, and the token bucket each gets (checked by the control plane). */
  routes?: string[]
  requestsPerSecond?: unknown
  burst?: unknown
  /** failover, rateLimit: lapses on its own after this long (null: until lifted). */
  ttlMs?: number | null
  /** failover: `fleet` writes it to etcd for every sidecar of the service (SPEC §16). */
  scope?: 'local' | 'fleet'
}

export interface Applied<T> {
  value: T
  persisted: boolean
}

/** Where fleet overrides go (etcd, SPEC §16): set only when `fleet` is configured. */
export interface FleetWriter {
  /** This sidecar's name in the fleet. */
  readonly instance: string
  /**
   * Write one override for the whole service; resolves with the etcd revision it was written at.
   * A ControlError 503 when etcd is unreachable.
   */
  write: (kind: keyof Omit<FleetState, 'revision'>, name: string, entry: FleetEntry) => Promise<number>
}
