/**
 * GitOps rollback with the real `git` command against local bare repositories: one revert per
 * incident however many sidecars push at once, conflicts and unreachable remotes reported,
 * credentials never in a message.
 */
import t, { type Test } from 'tap'
import { execFileSync } from 'node:child_process'
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { runGitRollback, redactCredentials, type GitRollbackConfig, type GitRollbackRequest } from '../src/control/git-rollback.js'

const ENV = { ...process.env, GIT_AUTHOR_NAME: 'dev', GIT_AUTHOR_EMAIL: 'dev@example.test', GIT_COMMITTER_NAME: 'dev', GIT_COMMITTER_EMAIL: 'dev@example.test', GIT_CONFIG_NOSYSTEM: '1' }

function git (cwd: string, ...args: string[]): string {
  return execFileSync('git', args, { cwd, env: ENV, encoding: 'utf8' }).trim()
}

interface Remote {
  dir: string
  bare: string
  /** A developer's clone, to commit releases and read the branch. */
  dev: string
  release: (version: string, file?: string) => string
  log: () => string[]
  show: (file: string) => string
}

/** A bare repository with an app manifest released twice (v1, then v2) plus an unrelated commit. */
async function remote (t: Test): Promise<Remote> {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-git-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const bare = join(dir, 'deploy.git')
  git(dir, 'init', '--quiet', '--bare', '--initial-branch=main', bare)
  const dev = join(dir, 'dev')
  git(dir, 'clone', '--quiet', bare, dev)
  git(dev, 'checkout', '--quiet', '-b', 'main')
  mkdirSync(join(dev, 'apps', 'checkout'), { recursive: true })
  const release = (version: string, file = join('apps', 'checkout', 'deployment.yaml')): string => {
    writeFileSync(join(dev, file), `image: shop/checkout:${version}\n`)
    git(dev, 'add', '-A')
    git(dev, 'commit', '--quiet', '-m', `checkout ${version}`)
    git(dev, 'push', '--quiet', 'origin', 'HEAD:main')
    return git(dev, 'rev-parse', 'HEAD')
  }
  release('1.0.0')
  release('2.0.0')
  writeFileSync(join(dev, 'README.md'), 'unrelated\n')
  git(dev, 'add', '-A')
  git(dev, 'commit', '--quiet', '-m', 'docs')
  git(dev, 'push', '--quiet', 'origin', 'HEAD:main')
  return {
    dir,
    bare,
    dev,
    release,
    log: () => { git(dev, 'pull', '--quiet', '--ff-only', 'origin', 'main'); return git(dev, 'log', '--format=%s', 'main').split('\n') },
    show: (file) => git(bare, 'show', `main:${file}`)
  }
}

function cfg (repo: string, extra: Partial<GitRollbackConfig> = {}): GitRollbackConfig {
  return { repo, branch: 'main', path: 'apps/checkout', author: 'Breakwater Bot <bot@example.test>', timeoutMs: 60_000, ...extra }
}

const REQ: GitRollbackRequest = { service: 'checkout', version: '2.0.0', trigger: 'error_rate_5pct', incident: 'inc-1', reason: 'error rate 12% after deploy' }

t.test('reverts the newest commit touching the path, with one commit naming service, version, trigger and incident', async (t) => {
  const r = await remote(t)
  const v2 = git(r.dev, 'log', '-n1', '--format=%H', 'main', '--', 'apps/checkout')
  const result = await runGitRollback(cfg(r.bare), REQ, join(r.dir, 'state-a'))
  t.equal(result.ok, true, result.error ?? 'ok')
  t.equal(result.reverted, v2, 'the release, not the newer unrelated commit')
  t.equal(result.alreadyReverted, false)
  t.equal(r.show('apps/checkout/deployment.yaml'), 'image: shop/checkout:1.0.0', 'the branch deploys the previous version again')
  t.equal(r.show('README.md'), 'unrelated', 'the unrelated change stays')
  t.same(r.log().slice(0, 2), ['Revert "checkout 2.0.0"', 'docs'])
  const message = git(r.dev, 'log', '-n1', '--format=%B', 'origin/main')
  t.match(message, /checkout 2\.0\.0 \(trigger error_rate_5pct, incident inc-1\)/)
  t.match(message, /^Breakwater-Incident: inc-1$/m)
  t.match(message, new RegExp(`This reverts commit ${v2}`))
  t.equal(git(r.dev, 'log', '-n1', '--format=%an <%ae>', 'origin/main'), 'Breakwater Bot <bot@example.test>')

  const again = await runGitRollback(cfg(r.bare), REQ, join(r.dir, 'state-a'))
  t.equal(again.ok, true)
  t.equal(again.alreadyReverted, true, 'the same incident again: nothing new, the clone is reused')
  t.equal(again.commit, result.commit)
  t.equal(r.log().filter((s) => s.startsWith('Revert')).length, 1)
})

/**
 * A pre-receive hook that holds every push until `count` have arrived (10 s at most): the
 * pushes then race for the branch, and all but one are rejected (the ref moved under them).
 */
function pushBarrier (bare: string, count: number): void {
  const hook = join(bare, 'hooks', 'pre-receive')
  writeFileSync(hook, [
    '#!/bin/sh',
    'cat >/dev/null',
    'dir="$(pwd)/push-barrier"',
    'mkdir -p "$dir" && : > "$dir/$$"',
    'i=0',
    `while [ "$(ls "$dir" | wc -l)" -lt ${count} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done`,
    'exit 0',
    ''
  ].join('\n'))
  chmodSync(hook, 0o755)
}

t.test('a fleet pushing at once makes exactly one revert per incident', async (t) => {
  const r = await remote(t)
  const fleet = 6
  pushBarrier(r.bare, fleet)
  // Each sidecar its own author, so their reverts are different commits (the same author in the
  // same second would build the same commit, and a second push of it would be no race at all).
  const results = await Promise.all(Array.from({ length: fleet }, async (_, i) => await runGitRollback(cfg(r.bare, { author: `Sidecar ${i} <s${i}@example.test>` }), REQ, join(r.dir, `state-${i}`))))
  t.ok(results.every((x) => x.ok), results.map((x) => x.error ?? 'ok').join('; '))
  t.equal(results.filter((x) => x.alreadyReverted === false).length, 1, 'one sidecar pushed the revert')
  t.ok(results.some((x) => x.alreadyReverted === true && x.attempts >= 1), 'a sidecar whose push was rejected fetched and found the revert already there')
  t.equal(new Set(results.map((x) => x.commit)).size, 1, 'every sidecar reports the same revert commit')
  t.equal(r.log().filter((s) => s.startsWith('Revert')).length, 1, 'one revert on the branch')
  t.equal(r.show('apps/checkout/deployment.yaml'), 'image: shop/checkout:1.0.0')
})

t.test('never rolls back twice: a second incident after a revert does not revert the release before', async (t) => {
  const r = await remote(t)
  t.equal((await runGitRollback(cfg(r.bare), REQ, join(r.dir, 'state'))).ok, true)
  const second = await runGitRollback(cfg(r.bare), { ...REQ, incident: 'inc-2' }, join(r.dir, 'state'))
  t.equal(second.ok, false)
  t.match(second.error, /already a Breakwater revert \(incident inc-1\); not rolling back further/)
  t.equal(r.show('apps/checkout/deployment.yaml'), 'image: shop/checkout:1.0.0', 'still the previous release, not 1.0.0 reverted too')
  const similar = await runGitRollback(cfg(r.bare), { ...REQ, incident: 'inc-10' }, join(r.dir, 'state'))
  t.equal(similar.alreadyReverted, undefined, 'inc-10 is not mistaken for inc-1')
})

t.test('a conflicting revert fails with the reason and leaves the branch alone', async (t) => {
  const r = await remote(t)
  // A release that touched the app's manifest and a shared file; a later commit (outside the
  // app's path) changed the same shared line, so reverting the release conflicts.
  mkdirSync(join(r.dev, 'shared'), { recursive: true })
  writeFileSync(join(r.dev, 'shared', 'versions.yaml'), 'checkout: 2.0.0\n')
  writeFileSync(join(r.dev, 'apps', 'checkout', 'deployment.yaml'), 'image: shop/checkout:3.0.0\n')
  git(r.dev, 'add', '-A')
  git(r.dev, 'commit', '--quiet', '-m', 'checkout 3.0.0')
  writeFileSync(join(r.dev, 'shared', 'versions.yaml'), 'checkout: 3.0.0\n')
  git(r.dev, 'commit', '--quiet', '-am', 'bump shared versions')
  git(r.dev, 'push', '--quiet', 'origin', 'HEAD:main')
  const before = git(r.dev, 'rev-parse', 'HEAD')
  const result = await runGitRollback(cfg(r.bare), REQ, join(r.dir, 'state'))
  t.equal(result.ok, false)
  t.match(result.error, /reverting [0-9a-f]{12} conflicts/)
  t.equal(git(r.bare, 'rev-parse', 'main'), before, 'nothing was pushed')
  const retry = await runGitRollback(cfg(r.bare, { path: 'README.md' }), { ...REQ, incident: 'inc-4' }, join(r.dir, 'state'))
  t.equal(retry.ok, true, 'the working clone is clean again after the aborted revert')
})

t.test('an unreachable remote, a missing branch and an empty path are clear failures', async (t) => {
  const r = await remote(t)
  const gone = await runGitRollback(cfg(join(r.dir, 'missing.git')), REQ, join(r.dir, 'state-gone'))
  t.equal(gone.ok, false)
  t.match(gone.error, /git clone failed/)
  const branch = await runGitRollback(cfg(r.bare, { branch: 'release' }), REQ, join(r.dir, 'state-branch'))
  t.equal(branch.ok, false)
  t.match(branch.error, /release/)
  const path = await runGitRollback(cfg(r.bare, { path: 'apps/payments' }), REQ, join(r.dir, 'state-path'))
  t.equal(path.ok, false)
  t.match(path.error, /no commit on main touches apps\/payments/)
})

t.test('credentials in the repository URL never reach a message', async (t) => {
  const r = await remote(t)
  // Nothing listens on port 9 of loopback: the clone fails at once, with the URL in git's output.
  const result = await runGitRollback(cfg('http://deployer:s3cr3t-token@127.0.0.1:9/deploy.git', { timeoutMs: 20_000 }), REQ, join(r.dir, 'state'))
  t.equal(result.ok, false)
  t.notMatch(result.error ?? '', /s3cr3t-token/)
  t.notMatch(result.error ?? '', /deployer/)
  t.equal(redactCredentials("fatal: unable to access 'https://user:pw@git.example/x.git/': refused"), "fatal: unable to access 'https://***@git.example/x.git/': refused")
})

/**
 * The bare repository of `r` served over git's smart HTTP protocol (the real `git http-backend`
 * behind a node:http server) to `user:password` only; every request's Authorization is kept.
 */
async function httpRemote (t: Test, r: Remote, user: string, password: string): Promise<{ url: (userinfo: string) => string, authorizations: string[] }> {
  const { createServer } = await import('node:http')
  const { spawn } = await import('node:child_process')
  const expected = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`
  const authorizations: string[] = []
  const server = createServer((req, res) => {
    authorizations.push(req.headers.authorization ?? '')
    if (req.headers.authorization !== expected) {
      req.resume()
      res.writeHead(401, { 'www-authenticate': 'Basic realm="deploy"' })
      res.end()
      return
    }
    const url = new URL(req.url ?? '/', 'http://remote')
    const cgi = spawn('git', ['http-backend'], {
      env: {
        ...ENV,
        GIT_PROJECT_ROOT: r.dir,
        GIT_HTTP_EXPORT_ALL: '1',
        REMOTE_USER: user,
        REQUEST_METHOD: req.method ?? 'GET',
        PATH_INFO: decodeURIComponent(url.pathname),
        QUERY_STRING: url.search.slice(1),
        CONTENT_TYPE: req.headers['content-type'] ?? '',
        HTTP_CONTENT_ENCODING: req.headers['content-encoding'] ?? '',
        GIT_HTTP_MAX_REQUEST_BUFFER: '100M'
      }
    })
    req.pipe(cgi.stdin)
    // CGI: header lines (`Status: 200 OK` among them), a blank line, the body.
    let head: Buffer = Buffer.alloc(0)
    let started = false
    cgi.stdout.on('data', (chunk: Buffer) => {
      if (started) { res.write(chunk); return }
      head = Buffer.concat([head, chunk])
      const end = head.indexOf('\r\n\r\n')
      if (end === -1) return
      started = true
      let status = 200
      for (const line of head.subarray(0, end).toString('latin1').split('\r\n')) {
        const colon = line.indexOf(':')
        const name = line.slice(0, colon).trim()
        const value = line.slice(colon + 1).trim()
        if (name.toLowerCase() === 'status') status = Number.parseInt(value, 10)
        else res.setHeader(name, value)
      }
      res.writeHead(status)
      res.write(head.subarray(end + 4))
    })
    cgi.on('close', () => { res.end() })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { server.closeAllConnections(); server.close() })
  const port = (server.address() as import('node:net').AddressInfo).port
  return { url: (userinfo) => `http://${userinfo}127.0.0.1:${port}/deploy.git`, authorizations }
}

/** Files under `dir` (recursively) whose bytes contain `secret`. */
async function filesHolding (dir: string, secret: string): Promise<string[]> {
  const { readdirSync } = await import('node:fs')
  const found: string[] = []
  for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile()) continue
    const path = join(entry.parentPath ?? entry.path, entry.name)
    if (readFileSync(path).includes(secret)) found.push(path)
  }
  return found
}

t.test('a token in an http(s) repository URL authenticates every request and is never written to disk', async (t) => {
  const r = await remote(t)
  const served = await httpRemote(t, r, 'deployer', 's3cr3t-token')
  const work = join(r.dir, 'state', 'git-rollback')
  const first = await runGitRollback(cfg(served.url('deployer:s3cr3t-token@')), REQ, work)
  t.equal(first.ok, true, `rolled back over http with the URL's credentials (${first.error ?? 'ok'})`)
  t.equal(r.show('apps/checkout/deployment.yaml'), 'image: shop/checkout:1.0.0', 'the revert reached the remote')
  t.ok(served.authorizations.length >= 3 && served.authorizations.every((a) => a !== ''), `every request to the remote carried the credentials (${served.authorizations.length})`)
  t.same(await filesHolding(work, 's3cr3t-token'), [], 'no file of the working clone holds the token')
  t.same(await filesHolding(work, 'deployer'), [], 'nor the user name')
  t.equal(git(work, 'remote', 'get-url', 'origin'), served.url(''), 'origin is the URL without credentials')

  // A clone an earlier version left with the credentials in its origin, and a new release.
  git(work, 'remote', 'set-url', 'origin', served.url('deployer:s3cr3t-token@'))
  r.log() // the developer's clone takes in the revert
  r.release('3.0.0')
  const second = await runGitRollback(cfg(served.url('deployer:s3cr3t-token@')), { ...REQ, version: '3.0.0', incident: 'inc-2' }, work)
  t.equal(second.ok, true, `the clone is reused (${second.error ?? 'ok'})`)
  t.equal(r.show('apps/checkout/deployment.yaml'), 'image: shop/checkout:1.0.0', '3.0.0 reverted')
  t.same(await filesHolding(work, 's3cr3t-token'), [], 'the stored credentials are gone')

  // The wrong token is refused by the remote and named nowhere.
  const wrong = await runGitRollback(cfg(served.url('deployer:wrong-token@'), { timeoutMs: 20_000 }), { ...REQ, incident: 'inc-3' }, join(r.dir, 'state', 'other'))
  t.equal(wrong.ok, false, 'a wrong token fails')
  t.notMatch(wrong.error ?? '', /wrong-token/, 'without naming it')
})

t.test('splitCredentials: http(s) userinfo becomes a Basic header; other URLs are kept', async (t) => {
  const { splitCredentials } = await import('../src/control/git-rollback.js')
  t.same(splitCredentials('https://x-access-token:gh%40p_1@git.example/org/deploy.git'), { url: 'https://git.example/org/deploy.git', authorization: `Basic ${Buffer.from('x-access-token:gh@p_1').toString('base64')}` })
  t.same(splitCredentials('https://token@git.example/deploy.git'), { url: 'https://git.example/deploy.git', authorization: `Basic ${Buffer.from('token:').toString('base64')}` })
  t.same(splitCredentials('https://git.example/deploy.git'), { url: 'https://git.example/deploy.git', authorization: null })
  t.same(splitCredentials('ssh://git@git.example/deploy.git'), { url: 'ssh://git@git.example/deploy.git', authorization: null })
  t.same(splitCredentials('/srv/git/deploy.git'), { url: '/srv/git/deploy.git', authorization: null })
  t.same(splitCredentials('git@git.example:org/deploy.git'), { url: 'git@git.example:org/deploy.git', authorization: null })
})

t.test('a remote that never answers is cut at the deadline', async (t) => {
  const r = await remote(t)
  const net = await import('node:net')
  const sockets: Array<import('node:net').Socket> = []
  const silent = net.createServer((s) => { sockets.push(s) }) // accepts, never answers
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { for (const s of sockets) s.destroy(); silent.close() })
  const port = (silent.address() as import('node:net').AddressInfo).port
  const result = await runGitRollback(cfg(`http://127.0.0.1:${port}/deploy.git`, { timeoutMs: 1500 }), REQ, join(r.dir, 'state'))
  t.equal(result.ok, false)
  t.match(result.error, /timed out/)
})

t.test('a git command that exits while a process it started holds its output does not hold the rollback', async (t) => {
  const r = await remote(t)
  // A post-commit hook that leaves a process behind with git's stderr (as an ssh control
  // master or a credential daemon may): it would write the marker when it ends.
  const hooks = join(r.dir, 'hooks')
  mkdirSync(hooks)
  const marker = join(r.dir, 'hook-child-finished')
  const pidFile = join(r.dir, 'hook-child.pid')
  writeFileSync(join(hooks, 'post-commit'), `#!/bin/sh\n(sleep 6; touch "${marker}") &\nps -o pgid= -p $$ > "${pidFile}"\n`)
  chmodSync(join(hooks, 'post-commit'), 0o755)
  const saved = { count: process.env.GIT_CONFIG_COUNT, key: process.env.GIT_CONFIG_KEY_0, value: process.env.GIT_CONFIG_VALUE_0 }
  Object.assign(process.env, { GIT_CONFIG_COUNT: '1', GIT_CONFIG_KEY_0: 'core.hooksPath', GIT_CONFIG_VALUE_0: hooks })
  t.teardown(() => {
    for (const [name, value] of [['GIT_CONFIG_COUNT', saved.count], ['GIT_CONFIG_KEY_0', saved.key], ['GIT_CONFIG_VALUE_0', saved.value]] as const) {
      if (value === undefined) Reflect.deleteProperty(process.env, name)
      else process.env[name] = value
    }
    try { process.kill(-Number(readFileSync(pidFile, 'utf8').trim()), 'SIGKILL') } catch {}
  })
  const result = await runGitRollback(cfg(r.bare), REQ, join(r.dir, 'state'))
  t.notOk(existsSync(marker), 'the rollback ended before the hook\'s child did')
  t.equal(result.ok, true, result.error ?? 'reverted')
  t.ok(existsSync(pidFile), 'the hook ran')
})

t.test('a sidecar configured with rollback type git reverts the release in the background', async (t) => {
  const { startTestSidecar } = await import('./helpers/sidecar.js')
  const { startUpstream } = await import('./helpers/upstream.js')
  const { admin } = await import('./helpers/admin.js')
  const { eventually } = await import('./helpers/http.js')
  const r = await remote(t)
  const app = await startUpstream()
  t.teardown(app.close)
  const s = await startTestSidecar(t, {
    version: '2.0.0',
    upstreams: { app: { url: app.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    rollback: { type: 'git', repo: r.bare, branch: 'main', path: 'apps/checkout', author: 'Breakwater Bot <bot@example.test>', requireRecentChange: false }
  })
  const started = await admin(s.admin, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'checkout 2.0.0 fails' })
  t.equal(started.status, 202, 'answered at once with a running record')
  const id = started.body.id as string
  t.ok(await eventually(async () => (await admin(s.admin, 'GET', `/v1/mitigations/${id}`)).body.status !== 'running', 60_000), 'the rollback ends')
  const done = await admin(s.admin, 'GET', `/v1/mitigations/${id}`)
  t.match(done.body, { status: 'succeeded', result: { ok: true, type: 'git', alreadyReverted: false } })
  t.equal(r.show('apps/checkout/deployment.yaml'), 'image: shop/checkout:1.0.0', 'the branch deploys the previous release')
  t.match(git(r.bare, 'log', '-n1', '--format=%B', 'main'), /Breakwater rolled back test 2\.0\.0 \(operator, incident [0-9a-f]{32}\)/)

  // The post-mortem draft names the revert commit and the key that made it one per fleet.
  const revert = git(r.bare, 'rev-parse', 'main')
  const key = git(r.bare, 'log', '-n1', '--format=%(trailers:key=Breakwater-Incident,valueonly)', 'main')
  t.match(key, /^[0-9a-f]{32}$/)
  t.ok(await eventually(async () => ((await admin(s.admin, 'GET', '/v1/audit?limit=100')).body.entries as Array<{ action: string }>).some((e) => e.action === 'mitigation.rollback.result'), 15_000), 'the result is audited')
  const incident = ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as Array<{ id: string }>)[0] as { id: string }
  const report = (await admin(s.admin, 'GET', `/v1/incidents/${incident.id}/report?format=json`)).body
  const timeline = report.timeline as Array<Record<string, unknown>>
  t.match(timeline.find((e) => e.commit !== undefined), { commit: revert, idempotencyKey: key, reverted: /^[0-9a-f]{40}$/ }, 'the timeline names the revert commit and the idempotency key (JSON)')
  t.ok(timeline.some((e) => e.idempotencyKey === key && e.commit === undefined && /started/.test(String(e.what))), 'the key is there from the start of the rollback')
  const md = await fetch(`${s.admin}/v1/incidents/${incident.id}/report`, { headers: { authorization: `Bearer ${(await import('./helpers/sidecar.js')).TEST_TOKEN}` } })
  const text = await md.text()
  t.match(text, new RegExp(`\\| [^|]*revert commit ${revert}[^|]*\\|`), 'the Markdown timeline names the revert commit')
  t.match(text, new RegExp(`\\| [^|]*idempotency key ${key}[^|]*\\|`), '... and the idempotency key')
})

t.test('validate: a git rollback needs repo and branch, and an author of the form Name <email>', async (t) => {
  const { resolveConfig } = await import('../src/config/load.js')
  const base = { service: 's', upstreams: { app: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }
  t.throws(() => resolveConfig({ ...base, rollback: { type: 'git', branch: 'main' } }), /rollback/)
  t.throws(() => resolveConfig({ ...base, rollback: { type: 'git', repo: '/x', branch: 'main', author: 'no email' } }), /rollback/)
  const ok = resolveConfig({ ...base, rollback: { type: 'git', repo: '/x', branch: 'main' } })
  t.match(ok.config.rollback, { type: 'git', repo: '/x', branch: 'main', path: null, author: null, timeoutMs: 120_000 })
})

t.test('credentials in rollback.repo reach the remote and nothing else: output, audit, records, state, incidents, report, notifications', async (t) => {
  const { startProcess, withoutTapHooks } = await import('./helpers/process.js')
  const { startReceiver } = await import('./helpers/receiver.js')
  const { admin } = await import('./helpers/admin.js')
  const { eventually } = await import('./helpers/http.js')
  const { TEST_TOKEN } = await import('./helpers/sidecar.js')
  const http = await import('node:http')
  // A git remote that asks for credentials, then fails: git's messages name the URL.
  const authorizations: string[] = []
  const remoteServer = http.createServer((req, res) => {
    req.resume()
    if (req.headers.authorization === undefined) { res.writeHead(401, { 'www-authenticate': 'Basic realm="deploy"' }); res.end(); return }
    authorizations.push(req.headers.authorization)
    res.writeHead(500); res.end('broken')
  })
  await new Promise<void>((resolve) => remoteServer.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { remoteServer.closeAllConnections(); remoteServer.close() })
  const port = (remoteServer.address() as import('node:net').AddressInfo).port
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const s = await startProcess(t, {
    version: '2.0.0',
    upstreams: { app: { url: 'http://127.0.0.1:9' } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    logging: { level: 'debug' },
    notifications: { webhooks: [`${hook.url}/events`], slackWebhookUrl: `${hook.url}/slack` },
    rollback: { type: 'git', repo: `http://deployer:s3cr3t-token@127.0.0.1:${port}/deploy.git`, branch: 'main', requireRecentChange: false, timeoutMs: '20s' }
    // An operator tracing git: its trace lines name the URL, credentials and all.
  }, { ...withoutTapHooks, BREAKWATER_ADMIN_TOKEN: TEST_TOKEN, GIT_TRACE: '1' })
  const base = String(s.lines.find((l) => l.msg === 'listening')?.admin)
  const started = await admin(base, 'POST', '/v1/mitigations', { action: 'rollback', reason: 'checkout 2.0.0 fails' })
  t.equal(started.status, 202)
  const id = started.body.id as string
  t.ok(await eventually(async () => (await admin(base, 'GET', `/v1/mitigations/${id}`)).body.status === 'failed', 30_000), 'the rollback failed')
  const record = await admin(base, 'GET', `/v1/mitigations/${id}`)
  t.match(record.body.error, /git clone failed: .*127\.0\.0\.1/, 'the record says why, naming the remote')
  t.same(authorizations.slice(0, 1), [`Basic ${Buffer.from('deployer:s3cr3t-token').toString('base64')}`], 'git did use the credentials')
  t.ok(await eventually(() => ['mitigation_failed', 'escalated'].every((e) => hook.deliveries.some((d) => d.body?.event === e)), 10_000), 'the failure was notified and escalated')
  const incident = ((await admin(base, 'GET', '/v1/incidents')).body.incidents as Array<{ id: string }>)[0] as { id: string }
  const texts: Record<string, string> = {
    stdout: JSON.stringify(s.lines),
    stderr: s.stderr(),
    record: JSON.stringify(record.body),
    audit: JSON.stringify((await admin(base, 'GET', '/v1/audit?limit=1000')).body),
    'audit log file': readFileSync(join(s.dir, 'state', 'audit.jsonl'), 'utf8'),
    'state file': readFileSync(join(s.dir, 'state', 'state.json'), 'utf8'),
    state: JSON.stringify((await admin(base, 'GET', '/v1/state')).body),
    incidents: JSON.stringify((await admin(base, 'GET', '/v1/incidents')).body),
    report: JSON.stringify((await admin(base, 'GET', `/v1/incidents/${incident.id}/report`)).body),
    notifications: JSON.stringify(hook.deliveries.map((d) => d.body))
  }
  for (const [where, text] of Object.entries(texts)) {
    if (where !== 'stderr') t.ok(text.length > 0, `${where} read`)
    t.notMatch(text, /s3cr3t|deployer/, `no credential in ${where}`)
  }
})
