// A second independent DPoP resource server for the interoperability tests: Auth0's
// express-oauth2-jwt-bearer (npm), which verifies the access token and the DPoP proof itself.
//
// The library (pinned in package.json) checks the JWT access token against the authorization
// server's JWKS (`iss`, `aud`, `exp`, ES256 signature) and, with `dpop.required`, the proof as
// RFC 9449 §4.3 and §7.1 ask: one proof, typ dpop+jwt, an asymmetric alg whose signature verifies
// with the `jwk` header, `htm`, `htu` (normalised, query and fragment ignored), `iat` within
// -300 s / +30 s, `jti` present, `ath` = base64url(SHA-256(token)) and `cnf.jkt` = the RFC 7638
// thumbprint of the proof key. It keeps no record of `jti` values and has no DPoP nonces.
//
// What this file adds on top (the library's own checks all run first, unchanged):
//   - replay detection (RFC 9449 §11.1): a proof `jti` seen before is refused with 401
//     invalid_dpop_proof. The switch `replay_check` (default on) turns it off, so a test can show
//     what the library does alone.
//   - the test hooks below and an echo of each good request.
//
// Configuration (environment):
//   RS2_PORT       port (0, the default, picks a free one)
//   RS2_ISSUER     the authorization server's issuer (required)
//   RS2_JWKS_URI   its JWKS URL (required: authgent-server publishes ISSUER/.well-known/jwks.json)
//   RS2_AUDIENCE   expected `aud` (default http://127.0.0.1:PORT/)
//
// Test hooks:
//   GET  /_interop/seen?since=N   every API request: method, url, proof, access_token, status, error
//   POST /_interop/config         {"replay_check": bool}
// INTEROP_EXIT_ON_STDIN_EOF=1: also exit when stdin reaches end of file (the parent died).
// Prints one JSON line {"ready": true, "url", "port", "audience"} on stdout; exits on SIGTERM/SIGINT.

import { createHash } from 'node:crypto';

import express from 'express';
import { auth } from 'express-oauth2-jwt-bearer';
import { stopOnSignals } from './lifecycle.mjs';

function fail(message) {
  process.stderr.write(`rs2.mjs: ${message}\n`);
  process.exit(2);
}

const issuer = process.env.RS2_ISSUER;
if (!issuer) fail('the authorization server issuer is required (RS2_ISSUER)');
const jwksUri = process.env.RS2_JWKS_URI;
if (!jwksUri) fail('the authorization server JWKS URL is required (RS2_JWKS_URI)');
const port = Number(process.env.RS2_PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail('bad port');

// The window in which the library accepts a proof's iat: a jti needs remembering that long.
const MAX_AGE = 300;
const MAX_FUTURE = 30;

const state = { replayCheck: true };
const seen = [];
const jtis = new Map(); // jti -> iat, pruned once the proof is too old to pass the iat check
const b64sha256 = (value) => createHash('sha256').update(value).digest('base64url');

class Replay extends Error {
  constructor() {
    super('DPoP proof jti replayed');
    this.status = 401;
    this.code = 'invalid_dpop_proof';
    this.headers = { 'WWW-Authenticate': `DPoP error="invalid_dpop_proof", error_description="DPoP proof jti replayed"` };
  }
}

function proofClaims(proof) {
  const part = proof.split('.')[1];
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

let audience = process.env.RS2_AUDIENCE;
const app = express();
app.disable('x-powered-by');

app.get('/_interop/seen', (req, res) => {
  const since = Number(req.query.since ?? 0);
  res.set('cache-control', 'no-store').json({ count: seen.length, seen: seen.slice(since) });
});
app.post('/_interop/config', express.json(), (req, res) => {
  const update = req.body ?? {};
  if ('replay_check' in update) {
    if (typeof update.replay_check !== 'boolean') return res.status(400).json({ error: 'replay_check must be a boolean' });
    state.replayCheck = update.replay_check;
  }
  return res.json({ replay_check: state.replayCheck });
});

// Record the request before the library sees it, so a refused one is recorded too.
app.use((req, res, next) => {
  const entry = {
    seq: seen.length,
    method: req.method,
    url: `http://${req.get('host')}${req.originalUrl}`,
    proof: req.get('dpop') ?? null,
    access_token: (req.get('authorization') ?? '').replace(/^DPoP /i, '') || null,
    status: null,
    error: null,
    time: Date.now() / 1000,
  };
  seen.push(entry);
  res.locals.entry = entry;
  next();
});

let verifier;
app.use((req, res, next) => verifier(req, res, next));

// RFC 9449 §11.1 replay detection, after the library has verified the proof (so its jti is
// signed by the key the token is bound to).
app.use((req, res, next) => {
  if (!state.replayCheck) return next();
  const { jti, iat } = proofClaims(req.get('dpop'));
  const now = Math.floor(Date.now() / 1000);
  for (const [oldJti, oldIat] of jtis) if (oldIat < now - MAX_AGE - MAX_FUTURE) jtis.delete(oldJti);
  if (jtis.has(jti)) return next(new Replay());
  jtis.set(jti, iat);
  return next();
});

app.use(express.raw({ type: () => true, limit: '10mb' }), (req, res) => {
  const body = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
  const url = new URL(req.originalUrl, 'http://127.0.0.1');
  res.locals.entry.status = 200;
  res.set('cache-control', 'no-store').json({
    ok: true,
    method: req.method,
    path: url.pathname,
    query: url.search,
    jkt: req.auth.payload.cnf.jkt,
    sub: req.auth.payload.sub,
    client_id: req.auth.payload.client_id,
    scope: req.auth.payload.scope ?? null,
    body_length: body.length,
    body_sha256: b64sha256(body),
  });
});

// The library's errors carry status, code and the WWW-Authenticate challenge (RFC 9449 §7.1).
// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  const status = Number.isInteger(err.status) ? err.status : 500;
  // The library leaves `code` empty on a malformed request (RFC 6750 §3.1: invalid_request).
  const code = err.code || (status === 500 ? 'server_error' : 'invalid_request');
  if (status === 500) process.stderr.write(`rs2.mjs: ${err.stack ?? err}\n`);
  const entry = res.locals.entry;
  if (entry) {
    entry.status = status;
    entry.error = code;
  }
  res.status(status).set({ 'cache-control': 'no-store', ...(err.headers ?? {}) });
  res.json({ error: code, error_description: err.message });
});

const server = app.listen(port, '127.0.0.1', () => {
  const actualPort = server.address().port;
  const base = `http://127.0.0.1:${actualPort}`;
  audience ??= `${base}/`;
  verifier = auth({
    issuer,
    audience,
    jwksUri,
    tokenSigningAlg: 'ES256',
    dpop: { enabled: true, required: true },
  });
  process.stdout.write(`${JSON.stringify({ ready: true, url: `${base}/`, port: actualPort, audience })}\n`);
});
server.on('error', (err) => fail(err.message));

stopOnSignals(server);
