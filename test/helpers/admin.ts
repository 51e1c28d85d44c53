/** A client for the admin API in tests. */
import { TEST_TOKEN } from './sidecar.js'

export interface AdminReply {
  status: number
  body: any
  headers: Headers
}

export async function admin (base: string, method: string, path: string, body?: unknown, token: string | null = TEST_TOKEN, rawBody?: string): Promise<AdminReply> {
  const headers: Record<string, string> = {}
  if (token !== null) headers.authorization = `Bearer ${token}`
  if (body !== undefined || rawBody !== undefined) headers['content-type'] = 'application/json'
  const res = await fetch(`${base}${path}`, { method, headers, body: rawBody ?? (body === undefined ? undefined : JSON.stringify(body)) })
  const text = await res.text()
  let parsed: unknown = text
  try { parsed = JSON.parse(text) } catch {}
  return { status: res.status, body: parsed, headers: res.headers }
}
