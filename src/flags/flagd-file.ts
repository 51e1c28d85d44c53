/**
 * A flagd-format flag file (https://flagd.dev/reference/flag-definitions/) as a flag source:
 * the fleet-wide path, shared through a ConfigMap or written by flagd tooling.
 *
 * Semantics, as flagd's own:
 * - `state: ENABLED` with a boolean `defaultVariant` gives that value;
 * - `state: DISABLED` — or no `defaultVariant` — resolves to the *code default*: for
 *   Breakwater the `featureFlags` value, else `true` (feature on). A DISABLED flag does not
 *   switch a feature off; `defaultVariant: "off"` does (`validate` warns about it);
 * - an ENABLED flag with `targeting` is evaluated per request by flagd-core itself (see
 *   targeting.ts), loaded only when a file has such a flag; every other flag is a snapshot read;
 * - flags whose variants are not booleans are someone else's and are ignored.
 *
 * The file is watched by polling `stat` (every 250 ms by default), which follows symlinks, so
 * both an in-place rewrite and the Kubernetes ConfigMap symlink swap are picked up — the
 * failure mode that broke inotify-based watchers (flagd #42). A file that cannot be parsed,
 * or has the wrong shape, is ignored with an error and the last good flags stay.
 */
import { readFileSync, statSync, type Stats } from 'node:fs'
import { readFile, stat } from 'node:fs/promises'
import type { FlagdEvaluator } from './targeting.js'

export interface FileFlags {
  /** Boolean value of each ENABLED flag with a boolean default variant. */
  values: Map<string, boolean>
  /** Flags present but resolving to the code default (DISABLED, or no default variant). */
  disabled: Set<string>
  /** ENABLED flags with targeting rules: their value depends on the request. */
  targeted: Set<string>
  /** The file's text, which flagd-core compiles when `targeted` is not empty. */
  text: string
  /** flagd-core holding this file, once compiled (see `compileTargeting`); null until then or when nothing is targeted. */
  targeting: FlagdEvaluator | null
}

export type FlagFileRead =
  | { kind: 'ok', flags: FileFlags }
  | { kind: 'missing' }
  | { kind: 'invalid', error: string }

/** Parse flagd JSON text. Throws with a message naming what is wrong. */
export function parseFlagFile (text: string): FileFlags {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch (err) {
    throw new Error(`not valid JSON: ${(err as Error).message}`)
  }
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) throw new Error('must be a JSON object')
  const flags = (doc as { flags?: unknown }).flags
  if (flags === null || typeof flags !== 'object' || Array.isArray(flags)) throw new Error('flags: must be an object')
  const out: FileFlags = { values: new Map(), disabled: new Set(), targeted: new Set(), text, targeting: null }
  for (const [key, def] of Object.entries(flags as Record<string, unknown>)) {
    if (def === null || typeof def !== 'object') throw new Error(`flags.${key}: must be an object`)
    const { state, variants, defaultVariant, targeting } = def as Record<string, unknown>
    if (state !== 'ENABLED' && state !== 'DISABLED') throw new Error(`flags.${key}.state: must be "ENABLED" or "DISABLED"`)
    if (variants === null || typeof variants !== 'object' || Array.isArray(variants) || Object.keys(variants).length === 0) {
      throw new Error(`flags.${key}.variants: must be a non-empty object`)
    }
    const values = Object.values(variants as Record<string, unknown>)
    if (!values.every((v) => typeof v === 'boolean')) continue // not a boolean flag: not ours
    if (defaultVariant !== undefined && defaultVariant !== null && (typeof defaultVariant !== 'string' || !(defaultVariant in (variants as object)))) {
      throw new Error(`flags.${key}.defaultVariant: must name one of its variants`)
    }
    // flagd-core's own test for "has targeting": a non-empty rule.
    if (state === 'ENABLED' && targeting !== undefined && targeting !== null && Object.keys(targeting as object).length > 0) {
      out.targeted.add(key)
      continue
    }
    if (state === 'DISABLED' || defaultVariant === undefined || defaultVariant === null) {
      out.disabled.add(key)
      continue
    }
    out.values.set(key, (variants as Record<string, boolean>)[defaultVariant as string] as boolean)
  }
  return out
}

export function readFlagFileSync (path: string): FlagFileRead {
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' }
    return { kind: 'invalid', error: (err as Error).message }
  }
  try {
    return { kind: 'ok', flags: parseFlagFile(text) }
  } catch (err) {
    return { kind: 'invalid', error: (err as Error).message }
  }
}

export interface FlagFileEvents {
  /** New flags were read (also the first read). */
  onFlags (flags: FileFlags | null): void
  /** The file could not be read or parsed; the last good flags stay. */
  onError (error: string): void
  /** The file disappeared or appeared. */
  onPresence (present: boolean): void
}

function fingerprint (s: Stats): string {
  return `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`
}

/** Polls the file and reports changes. */
export class FlagFileWatcher {
  private timer: NodeJS.Timeout | null = null
  private last = ''
  private present: boolean | null = null
  private busy = false

  constructor (readonly path: string, private readonly intervalMs: number, private readonly events: FlagFileEvents) {}

  /** Read once synchronously (start-up), then poll. */
  start (): void {
    try {
      this.last = fingerprint(statSync(this.path))
      this.present = true
    } catch {
      this.present = false
    }
    const first = readFlagFileSync(this.path)
    if (first.kind === 'ok') this.events.onFlags(first.flags)
    else if (first.kind === 'invalid') this.events.onError(first.error)
    this.timer = setInterval(() => { void this.poll() }, this.intervalMs)
    this.timer.unref()
  }

  private async poll (): Promise<void> {
    if (this.busy) return
    this.busy = true
    try {
      let print: string
      try {
        print = fingerprint(await stat(this.path))
      } catch {
        if (this.present !== false) {
          this.present = false
          this.last = ''
          this.events.onPresence(false)
        }
        return
      }
      if (this.present !== true) {
        this.present = true
        this.events.onPresence(true)
      }
      if (print === this.last) return
      let text: string
      try {
        text = await readFile(this.path, 'utf8')
      } catch (err) {
        this.events.onError((err as Error).message)
        return
      }
      this.last = print
      try {
        this.events.onFlags(parseFlagFile(text))
      } catch (err) {
        this.events.onError((err as Error).message)
      }
    } finally {
      this.busy = false
    }
  }

  stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }
}
