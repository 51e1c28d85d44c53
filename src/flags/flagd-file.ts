/**
 * A flagd-format flag file as a flag source: the fleet-wide path, shared through a ConfigMap or
 * written by flagd tooling. Its format and semantics are in `config/flag-file.ts`.
 *
 * The file is watched by polling `stat` (every 250 ms by default), which follows symlinks, so
 * both an in-place rewrite and the Kubernetes ConfigMap symlink swap are picked up — the
 * failure mode that broke inotify-based watchers (flagd #42). A file that cannot be parsed,
 * or has the wrong shape, is ignored with an error and the last good flags stay.
 */
import { statSync, type Stats } from 'node:fs'
import { readFile, stat } from 'node:fs/promises'
import { parseFlagFile, readFlagFileSync, type FileFlags } from '../config/flag-file.js'

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
