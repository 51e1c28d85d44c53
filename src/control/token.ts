/**
 * The admin API's bearer token: `BREAKWATER_ADMIN_TOKEN`, else `admin.tokenFile`, else one
 * generated at start and written to `STATEDIR/admin.token` with mode 0600 once the listeners
 * are bound (its path is logged, never the token). Tokens are compared in constant time.
 * `admin.tokenFile` is re-read when it changes (`TokenFileWatcher`): a rotated secret is the
 * token at once, for the sidecar as for the operator commands that read the same file.
 */
import { randomBytes, createHash, timingSafeEqual } from 'node:crypto'
import { readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { ADMIN_TOKEN_FILE } from '../config/defaults.js'
import { fileStamp } from '../config/file-stamp.js'
import { writeFileAtomic } from '../state/atomic-file.js'

export interface AdminToken {
  token: string
  /** Where it came from: `env`, `file` (admin.tokenFile) or `generated`. */
  origin: 'env' | 'file' | 'generated'
  /** The file an operator (or the CLI) reads it from, when there is one. */
  path: string | null
  /** False when a generated token is not (yet, or cannot be: stateDir unwritable) written. */
  written: boolean
}

/** The token `admin.tokenFile` holds; an error naming the key when it cannot be the token. */
async function readTokenFile (tokenFile: string): Promise<string> {
  let token: string
  try {
    token = (await readFile(tokenFile, 'utf8')).trim()
  } catch (err) {
    throw new Error(`admin.tokenFile: cannot read ${tokenFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
  }
  if (token.length < 16) throw new Error(`admin.tokenFile: ${tokenFile} holds a token shorter than 16 characters`)
  return token
}

export async function resolveAdminToken (env: string | undefined, tokenFile: string | null, stateDir: string): Promise<AdminToken> {
  if (env !== undefined && env.trim() !== '') return { token: env.trim(), origin: 'env', path: null, written: true }
  if (tokenFile !== null) return { token: await readTokenFile(tokenFile), origin: 'file', path: tokenFile, written: true }
  // Generated now, written by writeAdminToken only once the listeners are bound: a start that
  // fails (a busy port) never replaces the token of a sidecar already running on this config.
  return { token: randomBytes(32).toString('hex'), origin: 'generated', path: join(stateDir, ADMIN_TOKEN_FILE), written: false }
}

/** Write a generated token to its file (mode 0600); other origins are left as they are. */
export async function writeAdminToken (t: AdminToken): Promise<AdminToken> {
  if (t.origin !== 'generated' || t.path === null) return t
  try {
    // Created 0600 (never readable by others, not even before its content is written) and
    // renamed into place, fsynced: an older admin.token, whatever its permissions, is replaced
    // whole or stays as it was.
    await writeFileAtomic(t.path, t.token + '\n', 0o600)
    return { ...t, written: true }
  } catch {
    return { ...t, written: false }
  }
}

/** How often `admin.tokenFile` is checked for a change (as certificate files are). */
export const TOKEN_POLL_MS = 1000

/**
 * Re-reads `admin.tokenFile` when it changes (`stat` follows symlinks, so a Kubernetes Secret
 * volume's symlink swap is seen) and makes its content the token: after a rotation the old
 * token is refused and the new one, which the operator commands read from the same file, works.
 * A changed file is read once two checks in a row see it the same, as certificate files are
 * (`proxy/tls.ts`): a file rewritten in place in more than one write (truncated, then written)
 * is never taken half done — a prefix of the new token would be in force while the operator
 * commands, reading the whole file, were refused with 401, and the empty file between the two
 * writes would be an error line at every rotation.
 * A file that cannot be the token (missing, unreadable, too short: a rotation half done) is
 * refused with an error log, and the running token stays.
 */
export class TokenFileWatcher {
  private timer: NodeJS.Timeout | null = null
  /** The file as last applied (or refused). */
  private last: string | null = null
  /** The file as the previous check saw it. */
  private seen: string | null = null
  private polling = false

  constructor (private readonly path: string, private readonly apply: (token: string) => void, private readonly logger: Logger, private readonly intervalMs = TOKEN_POLL_MS) {}

  /** Watch from now on; `current` is the token read at start (the file may have changed since). */
  async start (current: string): Promise<void> {
    this.last = await this.fingerprint()
    this.seen = this.last
    this.timer = setInterval(() => { void this.poll() }, this.intervalMs)
    this.timer.unref()
    const now = await readTokenFile(this.path).catch(() => current)
    if (now !== current) this.changed(now)
  }

  stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
  }

  private changed (token: string): void {
    this.apply(token)
    this.logger.warn({ event: 'admin_token', path: this.path, result: 'reloaded' }, 'admin token file changed; its new token is in force')
  }

  private async fingerprint (): Promise<string> {
    return fileStamp(await stat(this.path).catch(() => null))
  }

  private async poll (): Promise<void> {
    if (this.polling) return
    this.polling = true
    try {
      const print = await this.fingerprint()
      const before = this.seen
      this.seen = print
      if (print === this.last || print !== before) return
      // Remembered even when refused: one error per change, not one per poll.
      this.last = print
      let token: string
      try {
        token = await readTokenFile(this.path)
      } catch (err) {
        this.logger.error({ event: 'admin_token', path: this.path, result: 'refused', error: (err as Error).message }, 'admin token file changed but cannot be the token; the running token is kept')
        return
      }
      if (this.timer !== null) this.changed(token)
    } finally {
      this.polling = false
    }
  }
}

function digest (text: string): Buffer {
  return createHash('sha256').update(text).digest()
}

/** Constant-time check of an `Authorization` header against the token. */
export function authorized (header: string | undefined, token: string): boolean {
  if (header === undefined) return false
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header)
  if (m === null) return false
  // Hash both so the comparison time depends on neither length nor content.
  return timingSafeEqual(digest(m[1] as string), digest(token))
}

export function isLoopback (host: string): boolean {
  return host === 'localhost' || host === '::1' || host === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(host)
}
