/**
 * The admin API's bearer token: `BREAKWATER_ADMIN_TOKEN`, else `admin.tokenFile`, else one
 * generated at start and written to `STATEDIR/admin.token` with mode 0600 once the listeners
 * are bound (its path is logged, never the token). Tokens are compared in constant time.
 */
import { randomBytes, createHash, timingSafeEqual } from 'node:crypto'
import { readFile, writeFile, mkdir, chmod, rename } from 'node:fs/promises'
import { join } from 'node:path'
import { ADMIN_TOKEN_FILE } from '../config/defaults.js'

export interface AdminToken {
  token: string
  /** Where it came from: `env`, `file` (admin.tokenFile) or `generated`. */
  origin: 'env' | 'file' | 'generated'
  /** The file an operator (or the CLI) reads it from, when there is one. */
  path: string | null
  /** False when a generated token is not (yet, or cannot be: stateDir unwritable) written. */
  written: boolean
}

export async function resolveAdminToken (env: string | undefined, tokenFile: string | null, stateDir: string): Promise<AdminToken> {
  if (env !== undefined && env.trim() !== '') return { token: env.trim(), origin: 'env', path: null, written: true }
  if (tokenFile !== null) {
    let token: string
    try {
      token = (await readFile(tokenFile, 'utf8')).trim()
    } catch (err) {
      throw new Error(`admin.tokenFile: cannot read ${tokenFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
    }
    if (token.length < 16) throw new Error(`admin.tokenFile: ${tokenFile} holds a token shorter than 16 characters`)
    return { token, origin: 'file', path: tokenFile, written: true }
  }
  // Generated now, written by writeAdminToken only once the listeners are bound: a start that
  // fails (a busy port) never replaces the token of a sidecar already running on this config.
  return { token: randomBytes(32).toString('hex'), origin: 'generated', path: join(stateDir, ADMIN_TOKEN_FILE), written: false }
}

/** Write a generated token to its file (mode 0600); other origins are left as they are. */
export async function writeAdminToken (t: AdminToken, stateDir: string): Promise<AdminToken> {
  if (t.origin !== 'generated' || t.path === null) return t
  try {
    await mkdir(stateDir, { recursive: true })
    // A fresh 0600 file renamed into place: the token is never in a file others can read,
    // even when an older admin.token had looser permissions.
    const tmp = `${t.path}.tmp-${process.pid}`
    await writeFile(tmp, t.token + '\n', { mode: 0o600 })
    await chmod(tmp, 0o600)
    await rename(tmp, t.path)
    return { ...t, written: true }
  } catch {
    return { ...t, written: false }
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
