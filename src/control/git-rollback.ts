/**
 * GitOps rollback (SPEC §19): the rollback is a commit that reverts the newest commit that
 * touched the deployed `path`, pushed to the branch the continuous-delivery system watches.
 * It runs the real `git` command in a working clone under `stateDir`:
 *
 * - one incident makes one revert, however many sidecars push at once: the revert commit
 *   carries a `Breakwater-Incident:` trailer; before reverting, and after a rejected push, the
 *   remote branch is searched for it, and a sidecar that finds it succeeds without a second one;
 * - a version is never rolled back twice: when the newest commit touching `path` is itself a
 *   Breakwater revert, nothing older is reverted (that would roll back past the last good one);
 * - it never waits for a person: no terminal prompt, every command under one deadline;
 * - credentials come from the environment or the user's git configuration (credential helper,
 *   SSH agent, a token in the URL) and never reach a message: userinfo in any URL is redacted
 *   from everything returned. A token in an http(s) URL never reaches the disk either: the
 *   clone's `origin` is the URL without it, and git gets it as an `Authorization` header
 *   scoped to that URL, through its environment (`GIT_CONFIG_*`), not its command line.
 */
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { runCommand } from './process-group.js'

export interface GitRollbackConfig {
  /** Remote URL or path of the repository the CD system deploys from. */
  repo: string
  branch: string
  /** Only commits touching this path are candidates (default: the whole repository). */
  path: string | null
  /** `Name <email>` of the revert commit; default `Breakwater <breakwater@localhost>`. */
  author: string | null
  /** Deadline for the whole rollback, every git command included. */
  timeoutMs: number
}

export interface GitRollbackRequest {
  service: string
  version: string
  trigger: string | null
  /** Names the incident in the commit trailer: the same id from every sidecar makes one revert. */
  incident: string
  reason: string
}

export interface GitRollbackResult {
  ok: boolean
  /** The revert commit on the remote branch (ours, or another sidecar's for the same incident). */
  commit?: string
  /** The commit that was reverted. */
  reverted?: string
  /** True when the revert for this incident was already on the branch: nothing was pushed. */
  alreadyReverted?: boolean
  /** Pushes tried (a rejected push is fetched, checked and tried again). */
  attempts: number
  error?: string
}

const TRAILER = 'Breakwater-Incident'
const PUSH_ATTEMPTS = 4

class GitFailure extends Error {}

/** `scheme://user:secret@host` → `scheme://***@host`, wherever it appears in `text`. */
export function redactCredentials (text: string): string {
  return text.replace(/([a-z][a-z0-9+.-]*:\/\/)[^/@\s'"]*@/gi, '$1***@')
}

/** Parse `Name <email>`; null when it is not of that form. */
export function parseAuthor (author: string): { name: string, email: string } | null {
  const m = /^\s*([^<>]+?)\s*<([^<>\s]+)>\s*$/.exec(author)
  return m === null ? null : { name: m[1] as string, email: m[2] as string }
}

/**
 * An http(s) URL's userinfo taken out: the URL git may store, and the `Authorization` header
 * that carries the credentials instead (git sends a URL's userinfo as Basic credentials too).
 * Other URLs (a path, ssh, where the user part is no secret) are left as they are.
 */
export function splitCredentials (repo: string): { url: string, authorization: string | null } {
  let parsed: URL
  try {
    parsed = new URL(repo)
  } catch {
    return { url: repo, authorization: null }
  }
  if ((parsed.protocol !== 'http:' && parsed.protocol !== 'https:') || (parsed.username === '' && parsed.password === '')) return { url: repo, authorization: null }
  const credentials = `${decodeURIComponent(parsed.username)}:${decodeURIComponent(parsed.password)}`
  parsed.username = ''
  parsed.password = ''
  return { url: parsed.href, authorization: `Basic ${Buffer.from(credentials).toString('base64')}` }
}

/** `env` plus one git config entry (`GIT_CONFIG_COUNT`, after any the environment has). */
function withGitConfig (env: NodeJS.ProcessEnv, key: string, value: string): NodeJS.ProcessEnv {
  const count = Number(env.GIT_CONFIG_COUNT ?? 0)
  const n = Number.isSafeInteger(count) && count > 0 ? count : 0
  return { ...env, GIT_CONFIG_COUNT: String(n + 1), [`GIT_CONFIG_KEY_${n}`]: key, [`GIT_CONFIG_VALUE_${n}`]: value }
}

interface Git {
  run: (args: string[], allowFail?: boolean) => Promise<{ code: number, out: string }>
}

/** Runs git in `dir`; every command is stopped (with its helpers) at `deadline`, or killed when `signal` aborts. */
function gitIn (dir: string, deadline: number, identity: { name: string, email: string }, remote: { url: string, authorization: string | null }, signal?: AbortSignal): Git {
  let env: NodeJS.ProcessEnv = {
    ...process.env,
    // Never wait for a person, never read a system pager or editor.
    GIT_TERMINAL_PROMPT: '0',
    GIT_ASKPASS: 'true',
    SSH_ASKPASS: 'true',
    GIT_SSH_COMMAND: process.env.GIT_SSH_COMMAND ?? 'ssh -o BatchMode=yes',
    GIT_EDITOR: 'true',
    GIT_PAGER: 'cat',
    GIT_AUTHOR_NAME: identity.name,
    GIT_AUTHOR_EMAIL: identity.email,
    GIT_COMMITTER_NAME: identity.name,
    GIT_COMMITTER_EMAIL: identity.email,
    LC_ALL: 'C'
  }
  // Only requests under the repository's URL carry it (not a redirect elsewhere).
  if (remote.authorization !== null) env = withGitConfig(env, `http.${remote.url}.extraHeader`, `Authorization: ${remote.authorization}`)
  return {
    run: async (args, allowFail = false) => {
      const left = deadline - Date.now()
      if (left <= 0) throw new GitFailure('timed out')
      if (signal?.aborted === true) throw new GitFailure('cut short: the sidecar is stopping')
      // Its own process group: git runs helpers (git-remote-https, ssh) that must stop with it,
      // and one left running (an ssh control master) must not hold the rollback open.
      const ran = await runCommand(['git', ...args], { cwd: dir, env, timeoutMs: left, signal, maxOutput: 8000 })
      if (ran.cut === 'timeout') throw new GitFailure(`timed out during git ${args[0] ?? ''}`)
      if (ran.cut === 'aborted') throw new GitFailure('cut short: the sidecar is stopping')
      if (ran.error !== undefined) throw new GitFailure(`git could not be started: ${ran.error}`)
      const result = { code: ran.code ?? -1, out: ran.output.trim() }
      if (result.code !== 0 && !allowFail) throw new GitFailure(`git ${args[0] ?? ''} failed: ${lastLines(result.out)}`)
      return result
    }
  }
}

function lastLines (text: string): string {
  return text.split('\n').filter((l) => l.trim() !== '').slice(-3).join(' / ') || '(no output)'
}

function commitMessage (subject: string, reverted: string, r: GitRollbackRequest): string {
  return [
    `Revert "${subject}"`,
    '',
    `Breakwater rolled back ${r.service} ${r.version} (${r.trigger === null ? 'operator' : `trigger ${r.trigger}`}, incident ${r.incident}).`,
    `Reason: ${r.reason}`,
    '',
    `This reverts commit ${reverted}.`,
    '',
    `${TRAILER}: ${r.incident}`,
    `Breakwater-Service: ${r.service}`,
    `Breakwater-Version: ${r.version}`
  ].join('\n')
}

/**
 * Revert the newest commit touching `config.path` on `config.branch` and push it, in a working
 * clone at `workDir` (created, or reused and reset to the remote branch). Never throws.
 */
export async function runGitRollback (config: GitRollbackConfig, r: GitRollbackRequest, workDir: string, signal?: AbortSignal): Promise<GitRollbackResult> {
  const identity = parseAuthor(config.author ?? '') ?? { name: 'Breakwater', email: 'breakwater@localhost' }
  const deadline = Date.now() + config.timeoutMs
  let attempts = 0
  try {
    const git = await checkout(config, workDir, deadline, identity, signal)
    const remote = `origin/${config.branch}`
    const pathArgs = config.path === null ? [] : ['--', config.path]
    for (;;) {
      const done = await incidentRevert(git, remote, r.incident)
      if (done !== null) return { ok: true, commit: done, alreadyReverted: true, attempts }
      const newest = (await git.run(['log', '-n1', '--format=%H%x00%s%x00%B', remote, ...pathArgs])).out
      if (newest === '') throw new GitFailure(`no commit on ${config.branch} touches ${config.path ?? 'the repository'}`)
      const [sha, subject, body] = newest.split('\u0000') as [string, string, string]
      const earlier = new RegExp(`^${TRAILER}: (.+)$`, 'm').exec(body)
      if (earlier !== null) throw new GitFailure(`the newest change to ${config.path ?? 'the repository'} (${sha.slice(0, 12)}) is already a Breakwater revert (incident ${(earlier[1] as string).trim()}); not rolling back further`)
      await git.run(['reset', '--hard', remote])
      const revert = await git.run(['revert', '--no-commit', sha], true)
      if (revert.code !== 0) {
        await git.run(['revert', '--abort'], true)
        throw new GitFailure(`reverting ${sha.slice(0, 12)} conflicts: ${lastLines(revert.out)}`)
      }
      await git.run(['commit', '--allow-empty', '-m', commitMessage(subject, sha, r)])
      const commit = (await git.run(['rev-parse', 'HEAD'])).out
      attempts++
      const push = await git.run(['push', '--porcelain', 'origin', `HEAD:refs/heads/${config.branch}`], true)
      if (push.code === 0) return { ok: true, commit, reverted: sha, alreadyReverted: false, attempts }
      // Rejected (another sidecar, or a person, pushed first): fetch and look again.
      if (attempts >= PUSH_ATTEMPTS) throw new GitFailure(`push rejected ${attempts} times: ${lastLines(push.out)}`)
      await git.run(['fetch', '--quiet', 'origin', config.branch])
    }
  } catch (err) {
    const message = err instanceof GitFailure ? err.message : (err as Error).message
    return { ok: false, attempts, error: redactCredentials(message) }
  }
}

/** A clone at `dir` whose `origin/BRANCH` is fresh; a broken clone is replaced. */
async function checkout (config: GitRollbackConfig, dir: string, deadline: number, identity: { name: string, email: string }, signal?: AbortSignal): Promise<Git> {
  const remote = splitCredentials(config.repo)
  if (existsSync(join(dir, '.git'))) {
    const git = gitIn(dir, deadline, identity, remote, signal)
    // Also replaces a URL with credentials that an earlier version stored.
    await git.run(['remote', 'set-url', 'origin', remote.url])
    const fetched = await git.run(['fetch', '--quiet', '--prune', 'origin', `+refs/heads/${config.branch}:refs/remotes/origin/${config.branch}`], true)
    if (fetched.code === 0) {
      await git.run(['reset', '--hard', '--quiet'], true)
      await git.run(['clean', '-fdxq'], true)
      return git
    }
    if (!/not a git repository|corrupt|broken/i.test(fetched.out)) throw new GitFailure(`git fetch failed: ${lastLines(fetched.out)}`)
    rmSync(dir, { recursive: true, force: true })
  }
  mkdirSync(dir, { recursive: true })
  const git = gitIn(dir, deadline, identity, remote, signal)
  await git.run(['clone', '--quiet', '--no-tags', '--branch', config.branch, '--single-branch', '--', remote.url, '.'])
  return git
}

/** The revert this incident already made on the remote branch, if any. */
async function incidentRevert (git: Git, remote: string, incident: string): Promise<string | null> {
  const exact = incident.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
  const found = (await git.run(['log', '-n1', '--format=%H', '--extended-regexp', `--grep=^${TRAILER}: ${exact}$`, remote])).out
  return found === '' ? null : found
}
