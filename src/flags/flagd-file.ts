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
 * failure mode that broke inotify-based watchers (flagd #42). A changed file is read once two
 * polls in a row see it the same, as certificate and token files are: a file rewritten in place
 * (truncated, then written) is never read half done, which was an error line and a counted
 * source error at every such edit. A file that cannot be parsed, or has the wrong shape, and
 * stays so, is ignored with an error and the last good flags stay.
 */
import { statSync } from 'node:fs'
import { readFile, stat } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseFlagFile as parseDefinitions, readFlagFileSync as readDefinitions, type FileFlags as FileDefinitions } from '../config/flag-file.js'
import type { FlagdEvaluator } from './targeting.js'
import { fileStamp } from '../config/file-stamp.js'

/** A parsed flag file, plus flagd-core holding it once its targeting rules are compiled. */
export interface FileFlags extends FileDefinitions {
  /** flagd-core holding this file, once compiled (see `compileTargeting`); null until then or when nothing is targeted. */
  targeting: FlagdEvaluator | null
}

export type FlagFileRead =
  | { kind: 'ok', flags: FileFlags }
  | { kind: 'missing' }
  | { kind: 'invalid', error: string }

/** Parse flagd JSON text (the format is config/flag-file.ts's). Throws with a message naming what is wrong. */
export function parseFlagFile (text: string): FileFlags {
  return { ...parseDefinitions(text), targeting: null }
}

export function readFlagFileSync (path: string): FlagFileRead {
  const read = readDefinitions(path)
  return read.kind === 'ok' ? { kind: 'ok', flags: { ...read.flags, targeting: null } } : read
}

export interface FlagFileEvents {
  /** New flags were read (also the first read). */
  onFlags (flags: FileFlags | null): void
  /** The file could not be read or parsed; the last good flags stay. */
  onError (error: string): void
  /** The file disappeared or appeared. */
  onPresence (present: boolean): void
}

/**
 * How long a start waits for a flag file it cannot parse to be written whole (at least two
 * polls): SPEC §14 applies every source change within 1 s, and a start is delayed only while
 * the file is being written.
 */
export const START_SETTLE_MS = 1000

/** The file's stamp now; `-` when it is not there. */
function currentStamp (path: string): string {
  try {
    return fileStamp(statSync(path))
  } catch {
    return fileStamp(null)
  }
}

/** Polls the file and reports changes. */
export class FlagFileWatcher {
  private timer: NodeJS.Timeout | null = null
  /** The file as last read (applied or refused). */
  private last = ''
  /** The file as the previous poll saw it. */
  private seen = ''
  private present: boolean | null = null
  private busy = false
  private stopped = false

  constructor (readonly path: string, private readonly intervalMs: number, private readonly events: FlagFileEvents) {}

  /**
   * Read the file (start-up), then poll. At start there are no last good flags to keep: a file
   * there but not whole (validation read it moments before, so it is being rewritten in place,
   * or it has just appeared half written) would put the sidecar on `featureFlags`, its kill
   * switches gone, until the polls after the writer finished. So a start that cannot parse it
   * waits for it as a poll does — read again once two polls in a row see it the same — for at
   * most `START_SETTLE_MS` (or two polls), and only then reports the error. A file read whole
   * at once is taken at once, with no wait; a missing one is picked up when it appears.
   * Resolves once the first read is taken or given up on.
   */
  async start (): Promise<void> {
    let stamp = currentStamp(this.path)
    let first = readFlagFileSync(this.path)
    if (first.kind === 'invalid') {
      const deadline = Date.now() + Math.max(START_SETTLE_MS, 2 * this.intervalMs)
      let tried = stamp
      while (first.kind === 'invalid' && !this.stopped) {
        const left = deadline - Date.now()
        if (left <= 0) break
        await sleep(Math.min(this.intervalMs, left))
        const seen = currentStamp(this.path)
        if (seen === stamp && seen !== tried) {
          tried = seen
          first = readFlagFileSync(this.path)
        }
        stamp = seen
      }
      stamp = tried
    }
    if (this.stopped) return
    this.present = first.kind !== 'missing'
    this.last = this.present ? stamp : ''
    this.seen = this.last
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
        print = fileStamp(await stat(this.path))
      } catch {
        if (this.present !== false) {
          this.present = false
          this.last = ''
          this.events.onPresence(false)
        }
        this.seen = ''
        return
      }
      if (this.present !== true) {
        this.present = true
        this.events.onPresence(true)
      }
      const before = this.seen
      this.seen = print
      if (print === this.last || print !== before) return
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
    this.stopped = true
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }
}
