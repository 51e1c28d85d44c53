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

/** Polls the file and reports changes. */
export class FlagFileWatcher {
  private timer: NodeJS.Timeout | null = null
  /** The file as last read (applied or refused). */
  private last = ''
  /** The file as the previous poll saw it. */
  private seen = ''
  private present: boolean | null = null
  private busy = false

  constructor (readonly path: string, private readonly intervalMs: number, private readonly events: FlagFileEvents) {}

  /** Read once synchronously (start-up), then poll. */
  start (): void {
    try {
      this.last = fileStamp(statSync(this.path))
      this.seen = this.last
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
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }
}
