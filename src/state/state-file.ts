/**
 * The persisted control-plane state, `STATEDIR/state.json`: flag overrides, forced circuits,
 * active mitigations, the versions this sidecar has seen. Written atomically — a temp file in
 * the same directory, fsync, rename over the old one, fsync of the directory — so a `kill -9`
 * at any instant leaves either the old file or the new one, never a torn one. A file that
 * cannot be parsed at start is moved aside (`state.json.corrupt-<time>`) and Breakwater starts
 * clean, rather than crash-looping on it. A file a newer Breakwater wrote (a higher `version`:
 * the binary was rolled back after an upgrade) is read for what this version knows, and copied
 * aside whole first (`state.json.v<N>-<time>`, once: a copy already there is kept).
 */
import { rename, readFile, readdir, stat, copyFile } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { writeFileAtomic } from './atomic-file.js'

export interface OverrideRecord {
  enabled: boolean
  reason: string
  /** `operator` or `trigger:<name>` (absent in older files: operator). */
  source?: string
  at: string
  /** ISO time after which the override lapses on its own. */
  expiresAt: string | null
}

export interface ForcedCircuitRecord {
  state: 'open' | 'closed'
  reason: string
  source?: string
  at: string
  expiresAt: string | null
}

export interface Change {
  kind: 'flag' | 'circuit'
  target: string
  /** What was there before this mitigation changed it (null = nothing: no override / automatic). */
  before: OverrideRecord | ForcedCircuitRecord | null
}

export interface MitigationRecord {
  id: string
  action: 'killSwitch' | 'circuitBreak' | 'rollback' | 'failover' | 'rateLimit'
  targets: string[]
  reason: string
  /** `operator` or `trigger:<name>`. */
  source: string
  createdAt: string
  /**
   * `active` → `lifted` for kill switches and circuit breaks. A rollback runs in the
   * background: `running` → `succeeded` | `failed`; lifting a succeeded one only closes it
   * (`lifted`), since a rollback is not undone.
   */
  status: MitigationStatus
  liftedAt: string | null
  liftReason: string | null
  changes: Change[]
  /** For rollbacks: what the rollback action answered. */
  result: Record<string, unknown> | null
  /** For rollbacks: when the action ended, and why it failed. */
  finishedAt?: string | null
  error?: string | null
  /** For failovers and rate limits: when it lapses on its own (null: until lifted). */
  expiresAt?: string | null
  /** For a failover: where the traffic goes. */
  to?: string
  /** For a rate limit: the token bucket each target route gets. */
  limit?: { requestsPerSecond: number, burst: number }
  /** `fleet` for a failover written to etcd (a view of its fleet entry, not kept in this list). */
  scope?: 'fleet'
}

/**
 * A fleet override as written to etcd (`{prefix}/{service}/flags/{key}`, `…/circuits/{upstream}`
 * or `…/failovers/{upstream}`) and kept here as last seen (SPEC §16).
 */
export interface FleetEntry {
  /**
   * A flag's `true`/`false`, a circuit's `open`/`closed`, a failover's target upstream; null:
   * the fleet override was dropped or the failover lifted (a decision too).
   */
  value: boolean | string | null
  reason: string
  requester: string
  /** When the operator decided (ISO); the newest decision wins, local or fleet. */
  at: string
  ttlMs: number | null
  /** ISO time after which it lapses on every sidecar, by each one's own clock. */
  expiresAt: string | null
  /** The sidecar that wrote it. */
  instance: string
  /** A failover's mitigation id, the same on every sidecar (lift it by this id from any of them). */
  id?: string
}

export interface FleetState {
  /** The etcd revision the fleet state was last seen at. */
  revision: number
  flags: Record<string, FleetEntry>
  circuits: Record<string, FleetEntry>
  /** Failovers by upstream (absent in older state files). */
  failovers: Record<string, FleetEntry>
}

export type MitigationStatus = 'active' | 'lifted' | 'running' | 'succeeded' | 'failed'

export interface PersistedState {
  version: 1
  overrides: Record<string, OverrideRecord>
  circuits: Record<string, ForcedCircuitRecord>
  mitigations: MitigationRecord[]
  /** Version string → ISO time this sidecar first ran it. */
  versions: Record<string, string>
  /** Hash of the config → ISO time first seen (config changes, for triage and triggers). */
  configs: Record<string, string>
  /** Versions already rolled back (never twice). */
  rolledBack: Record<string, string>
  /** The newest incidents (SPEC §19): open ones resume after a restart, closed ones keep their report. */
  incidents: unknown[]
  /** Status page incidents by incident key: the page's id and the last status sent. */
  statusPage: Record<string, { id: string | null, status: string, round?: number, after?: string }>
  /** The last fleet state seen in etcd (kept across restarts without etcd). */
  fleet: FleetState
}

export function emptyState (): PersistedState {
  return { version: 1, overrides: {}, circuits: {}, mitigations: [], versions: {}, configs: {}, rolledBack: {}, incidents: [], statusPage: {}, fleet: emptyFleet() }
}

export function emptyFleet (): FleetState {
  return { revision: 0, flags: {}, circuits: {}, failovers: {} }
}

/** The state format this version reads and writes (`version` in the file). */
export const STATE_FORMAT = 1

const ACTIONS: ReadonlySet<string> = new Set<MitigationRecord['action']>(['killSwitch', 'circuitBreak', 'rollback', 'failover', 'rateLimit'])

export interface LoadResult {
  state: PersistedState
  /** Where a corrupt or unreadable file was moved aside (null: not moved: none, or it could not be). */
  movedAside: string | null
  /** Why the file was not loaded: it could not be read (`unreadable`), or is not a state file. */
  error: string | null
  problem: 'corrupt' | 'unreadable' | null
  /**
   * A file a newer Breakwater wrote, read for what this version knows: its format, where the
   * whole file was copied (null: it could not be), and the mitigations of actions this version
   * does not know, left out.
   */
  newer: { format: number, copiedTo: string | null, mitigationsLeftOut: number } | null
}

export class StateFile {
  readonly path: string

  constructor (readonly dir: string) {
    this.path = join(dir, 'state.json')
  }

  async load (): Promise<LoadResult> {
    let text: string
    try {
      // A FIFO would hang the start, a directory never reads: neither is a state file.
      if (!(await stat(this.path)).isFile()) throw new Error(`${this.path} is not a regular file`)
      text = await readFile(this.path, 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { state: emptyState(), movedAside: null, error: null, problem: null, newer: null }
      // Unreadable now (EACCES after a change of user, EIO) is not empty: the clean state written
      // next would replace a file that may hold kill switches in force. It is kept aside instead.
      return { state: emptyState(), movedAside: await this.moveAside('unreadable'), error: (err as Error).message, problem: 'unreadable', newer: null }
    }
    try {
      const parsed = JSON.parse(text) as Partial<PersistedState>
      const format = parsed !== null && typeof parsed === 'object' ? (parsed as { version?: unknown }).version : undefined
      const newer = typeof format === 'number' && Number.isInteger(format) && format > STATE_FORMAT ? format : null
      if (format !== STATE_FORMAT && newer === null) throw new Error(`not a Breakwater state file (version ${STATE_FORMAT})`)
      // Valid JSON of the wrong shape (a hand edit, another program's file) would otherwise
      // crash the sidecar at start — or later, on the first expiry sweep — on every restart.
      const problem = shapeProblem(parsed as Record<string, unknown>)
      if (problem !== null) {
        throw new Error(newer === null ? `not a Breakwater state file: ${problem}` : `written by a newer Breakwater (state format ${newer}; this one reads format ${STATE_FORMAT}) in a shape this one cannot read: ${problem}`)
      }
      // A file from before fleet failovers has no `fleet.failovers`: the missing keys start empty.
      const state: PersistedState = { ...emptyState(), ...parsed, fleet: { ...emptyFleet(), ...parsed.fleet }, version: STATE_FORMAT }
      if (newer === null) return { state, movedAside: null, error: null, problem: null, newer: null }
      // The binary was rolled back after an upgrade: exactly when the kill switches and forced
      // circuits in force matter most. What this version knows is read; the whole file is copied
      // first, since the next write keeps only that; a mitigation of an action it does not know
      // could not be shown or lifted, and is left out (what it changed is in the overrides).
      const known = state.mitigations.filter((m) => ACTIONS.has(m.action))
      const mitigationsLeftOut = state.mitigations.length - known.length
      state.mitigations = known
      return { state, movedAside: null, error: null, problem: null, newer: { format: newer, copiedTo: await this.copyAside(`v${newer}`, text), mitigationsLeftOut } }
    } catch (err) {
      return { state: emptyState(), movedAside: await this.moveAside('corrupt'), error: (err as Error).message, problem: 'corrupt', newer: null }
    }
  }

  private asidePath (why: string): string {
    return `${this.path}.${why}-${new Date().toISOString().replace(/[:.]/g, '-')}`
  }

  /**
   * A copy of the file as it is, beside it (`state.json.v2-…`), or the copy of it already there;
   * null when it cannot be made. Until this version writes the state (a start that cannot: a
   * full disk, a crash loop) every start reads the newer file again: one copy is kept, not one
   * more per start to eat the space left.
   */
  private async copyAside (why: string, text: string): Promise<string | null> {
    const earlier = await this.copyOf(why, text)
    if (earlier !== null) return earlier
    const aside = this.asidePath(why)
    try {
      await copyFile(this.path, aside)
      return aside
    } catch {
      return null
    }
  }

  /** A `state.json.<why>-…` beside the file that holds `text` already, or null. */
  private async copyOf (why: string, text: string): Promise<string | null> {
    const prefix = `${basename(this.path)}.${why}-`
    const names = await readdir(this.dir).catch(() => [] as string[])
    const size = (await stat(this.path).catch(() => null))?.size
    for (const name of names.filter((n) => n.startsWith(prefix)).sort()) {
      const path = join(this.dir, name)
      const s = await stat(path).catch(() => null)
      if (s === null || !s.isFile() || s.size !== size) continue
      if ((await readFile(path, 'utf8').catch(() => null)) === text) return path
    }
    return null
  }

  /** Keep the file for a post-mortem beside it (`state.json.corrupt-…`); null when it cannot be moved. */
  private async moveAside (why: 'corrupt' | 'unreadable'): Promise<string | null> {
    const aside = this.asidePath(why)
    try {
      await rename(this.path, aside)
      return aside
    } catch {
      return null // unwritable: start clean anyway
    }
  }

  static serialise (state: PersistedState): string {
    return JSON.stringify(state, null, 2) + '\n'
  }

  /** Write one serialised state atomically (mode 0600); callers serialise their writes (see Journal). */
  async write (text: string): Promise<void> {
    await writeFileAtomic(this.path, text, 0o600)
  }
}

const isRecord = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v)
const isTime = (v: unknown): boolean => v === undefined || v === null || typeof v === 'string'

/**
 * The first way `parsed` departs from the shape the control plane reads, or null. Keys absent
 * from older files start empty; a key present with the wrong type is a foreign file.
 */
function shapeProblem (parsed: Record<string, unknown>): string | null {
  for (const key of ['overrides', 'circuits', 'versions', 'configs', 'rolledBack', 'statusPage', 'fleet'] as const) {
    if (parsed[key] !== undefined && !isRecord(parsed[key])) return `${key} must be an object`
  }
  for (const key of ['mitigations', 'incidents'] as const) {
    const list = parsed[key]
    if (list === undefined) continue
    if (!Array.isArray(list)) return `${key} must be an array`
    if (!list.every(isRecord)) return `${key} must hold objects`
  }
  for (const [flag, o] of Object.entries((parsed.overrides ?? {}) as Record<string, unknown>)) {
    if (!isRecord(o) || typeof o.enabled !== 'boolean' || !isTime(o.expiresAt)) return `overrides.${flag} must have a boolean enabled`
  }
  for (const [upstream, c] of Object.entries((parsed.circuits ?? {}) as Record<string, unknown>)) {
    if (!isRecord(c) || (c.state !== 'open' && c.state !== 'closed') || !isTime(c.expiresAt)) return `circuits.${upstream} must have a state of open or closed`
  }
  for (const key of ['versions', 'configs', 'rolledBack'] as const) {
    if (!Object.values((parsed[key] ?? {}) as Record<string, unknown>).every((v) => typeof v === 'string')) return `${key} must map names to times`
  }
  for (const [i, m] of ((parsed.mitigations ?? []) as Array<Record<string, unknown>>).entries()) {
    if (typeof m.id !== 'string' || typeof m.action !== 'string' || typeof m.status !== 'string' || !Array.isArray(m.targets) || (m.changes !== undefined && !Array.isArray(m.changes))) return `mitigations[${i}] is not a mitigation record`
  }
  const fleet = parsed.fleet as Record<string, unknown> | undefined
  if (fleet !== undefined) {
    if (fleet.revision !== undefined && typeof fleet.revision !== 'number') return 'fleet.revision must be a number'
    for (const key of ['flags', 'circuits', 'failovers'] as const) {
      const entries = fleet[key]
      if (entries !== undefined && (!isRecord(entries) || !Object.values(entries).every(isRecord))) return `fleet.${key} must map names to entries`
    }
  }
  return null
}
