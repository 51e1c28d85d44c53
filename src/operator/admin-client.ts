/**
 * How the CLI finds and talks to a running sidecar's admin API: the URL from `--admin`
 * (repeatable: fan out to several sidecars), else the config's `listen.admin`, else
 * 127.0.0.1:14000; the token from `BREAKWATER_ADMIN_TOKEN`, `--token-file`, the config's
 * `admin.tokenFile`, or the token the sidecar generated in its `stateDir`.
 */
import { readFile } from 'node:fs/promises'
import { request as httpRequest, type IncomingMessage } from 'node:http'
import { DEFAULT_ADMIN_LISTEN } from '../config/defaults.js'
import type { AdminSettings } from '../config/admin-settings.js'

export interface Target {
  admin: string
  token: string | null
}

export interface Answer {
  admin: string
  ok: boolean
  status: number
  body: any
  /** The answer's `content-type`, without parameters ('' when none). */
  contentType: string
  /** Set when a 2xx answer is not the admin API's (the CLI aimed at another port). */
  foreign?: boolean
  /** Set when the sidecar could not be reached, or did not answer in time. */
  unreachable?: string
  /** Set when the sidecar did not answer within the command's timeout. */
  timedOut?: boolean
}

export interface TargetOptions {
  admin: string[]
  tokenFile?: string
  configPath: string | null
  env: NodeJS.ProcessEnv
}

export async function resolveTargets (o: TargetOptions): Promise<{ targets: Target[], notes: string[] }> {
  const notes: string[] = []
  let config: AdminSettings | null = null
  if (o.configPath !== null) {
    try {
      // The light reader: three keys, no schema (loading the config compiler would be most of
      // an operator command's start-up).
      const { readAdminSettings } = await import('../config/admin-settings.js')
      config = await readAdminSettings(o.configPath, o.env)
    } catch {
      notes.push(`could not read ${o.configPath}; using defaults`)
    }
  }
  let token: string | null = null
  const fromEnv = o.env.BREAKWATER_ADMIN_TOKEN
  if (fromEnv !== undefined && fromEnv.trim() !== '') token = fromEnv.trim()
  else {
    const file = o.tokenFile ?? config?.tokenFile ?? config?.generatedTokenFile ?? null
    if (file !== null) {
      try {
        token = (await readFile(file, 'utf8')).trim()
      } catch {
        notes.push(`no token: set BREAKWATER_ADMIN_TOKEN or --token-file (could not read ${file})`)
      }
    } else {
      notes.push('no token: set BREAKWATER_ADMIN_TOKEN, --token-file or --config')
    }
  }
  let admins = o.admin
  if (admins.length === 0) {
    const a = config?.admin ?? DEFAULT_ADMIN_LISTEN
    const host = a.host === '0.0.0.0' ? '127.0.0.1' : a.host.includes(':') ? `[${a.host}]` : a.host
    admins = [`http://${host}:${a.port}`]
  }
  return { targets: admins.map((admin) => ({ admin: admin.replace(/\/+$/, ''), token })), notes }
}

/**
 * How long a command waits for a sidecar's answer (connecting included) when `--timeout` is not
 * given. A sidecar answers from memory (SPEC §15: operators never wait); one that says nothing
 * for this long is hung or starved, and the operator is told so rather than left at a frozen
 * terminal.
 */
export const ANSWER_TIMEOUT_MS = 5000

/** The same with `--fleet`: the sidecar may try etcd for up to 4 s before it answers 503 `fleet_unavailable`. */
export const FLEET_ANSWER_TIMEOUT_MS = 10_000

/**
 * One request to the admin API over `node:http` (an operator command loads no HTTP client
 * library). `timeoutMs` bounds the wait for the answer's status line, connecting included, and
 * then each wait between two pieces of its body.
 */
export async function call (target: Target, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body: unknown, timeoutMs: number): Promise<Answer> {
  const payload = body === undefined ? undefined : JSON.stringify(body)
  let deadline: NodeJS.Timeout | undefined
  try {
    const url = new URL(`${target.admin}${path}`)
    // node:https (and TLS with it) only for an https:// admin URL: the admin listener speaks plain HTTP.
    const send = url.protocol === 'https:' ? (await import('node:https')).request : httpRequest
    const { status, text, contentType } = await new Promise<{ status: number, text: string, contentType: string }>((resolve, reject) => {
      const noAnswer = (): void => { req.destroy(Object.assign(new Error(`no answer within ${seconds(timeoutMs)}`), { code: 'ETIMEDOUT', noAnswer: true })) }
      const req = send(url, {
        method,
        agent: false,
        headers: {
          ...(target.token !== null ? { authorization: `Bearer ${target.token}` } : {}),
          ...(payload !== undefined ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {})
        }
      }, (res: IncomingMessage) => {
        clearTimeout(deadline)
        req.setTimeout(timeoutMs, noAnswer)
        const chunks: Buffer[] = []
        res.on('data', (chunk: Buffer) => chunks.push(chunk))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8'), contentType: (res.headers['content-type'] ?? '').split(';')[0]?.trim().toLowerCase() ?? '' }))
        res.on('error', reject)
        res.on('close', () => { if (!res.complete) reject(Object.assign(new Error('the answer was cut off'), { code: 'ECONNRESET' })) })
      })
      // One deadline from the start, not an idle timer: a sidecar that accepts and then says
      // nothing (hung, or its event loop blocked) would otherwise hold the terminal.
      deadline = setTimeout(noAnswer, timeoutMs)
      req.on('error', reject)
      req.end(payload)
    })
    let parsed: unknown = text
    try { parsed = JSON.parse(text) } catch {}
    return { admin: target.admin, ok: status >= 200 && status < 300, status, body: parsed, contentType }
  } catch (err) {
    const e = err as { code?: string, noAnswer?: boolean, message: string }
    const code = e.noAnswer === true ? e.message : e.code ?? e.message
    return { admin: target.admin, ok: false, status: 0, body: null, contentType: '', unreachable: code, ...(e.noAnswer === true ? { timedOut: true } : {}) }
  } finally {
    clearTimeout(deadline)
  }
}

function seconds (ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`
}
