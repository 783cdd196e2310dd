/**
 * relay-client.js — stream a chat answer from Chat Relay into a single-page app, token by token.
 *
 * A dependency-free ES module over the relay's server-sent events
 * (`POST /api/stream_chat_completion` with `Accept: text/event-stream`). It parses the events,
 * picks a resumable answer up again when the connection drops part-way (`GET /api/streams/<id>`
 * from the last event received) and reports failures; it keeps no conversation and renders
 * nothing — that is the app's job.
 */

const STREAM_ID_HEADER = "X-Relay-Stream-Id";
const RESUME_ATTEMPTS = 6;  // tries since the last event received, before the answer is given up
const RESUME_FIRST_DELAY_MS = 250;  // doubled for each further try...
const RESUME_MAX_DELAY_MS = 4000;  // ...up to this: about 12 s of waiting in all

/**
 * A failed answer. `code` is the relay's error code (`model_not_allowed`, `rate_limited`,
 * `upstream_timeout`...), or one of this module's own when the relay could not say:
 * `connection_failed` (the network or the relay went away), `incomplete_stream` (the stream ended
 * without its `done` event), `bad_response` (something that is not the relay's format).
 * A resumable answer that could not be picked up again keeps the code of the drop that cut it
 * (`connection_failed` or `incomplete_stream`); its `cause` then says why resuming failed.
 */
export class RelayError extends Error {
  /**
   * @param {string} message a sentence for people
   * @param {{code: string, type?: string | null, status?: number | null, cause?: unknown}} details
   */
  constructor(message, {code, type = null, status = null, cause} = {}) {
    super(message, cause === undefined ? undefined : {cause});
    this.name = "RelayError";
    /** @type {string} */
    this.code = code;
    /** @type {string | null} the OpenAI error type, e.g. "invalid_request_error" */
    this.type = type;
    /** @type {number | null} the HTTP status when the relay refused before streaming; null mid-answer */
    this.status = status;
  }
}

/**
 * Stream one chat completion through the relay, yielding each token (a string) as it arrives.
 *
 * The loop ends normally only when the relay says the answer is complete. Anything else throws:
 * a {@link RelayError} with the relay's error `code` when the relay refuses (HTTP 4xx/5xx) or the
 * answer fails part-way, or `signal.reason` (an `AbortError` by default) when `signal` aborts.
 * Aborting, or leaving the loop early (`break`, `return`, an exception), cancels the request, and
 * the relay then stops the upstream so no more tokens are paid for (for a resumable answer, which
 * the relay would otherwise keep going for a resume, this also sends `DELETE /api/streams/<id>`,
 * as does the page being reloaded or closed mid-answer).
 *
 * Every request asks for a resumable answer. A relay with `RELAY_RESUME_SECONDS` set gives the
 * answer an id and numbers its events; if the connection then drops part-way (a network error, or
 * the body ending without `done`), this function fetches the rest from the last event received and
 * keeps yielding, so the loop sees each token once and never notices. It tries up to 6 times
 * since the last event received, waiting 250 ms, then twice as long each time (at most 4 s, with a
 * little jitter so that many pages do not all come back at once). If the relay refuses (an answer
 * that expired, or a 4xx such as 404 `stream_not_found`) or every try fails, the loop throws a
 * RelayError with the drop's own code, `connection_failed` or `incomplete_stream`, whose `cause`
 * is the last failure: a RelayError with the relay's code and HTTP status, or the network's error.
 * Without resume on the relay, a drop throws at once, as it always did. Aborting stops at once,
 * also while waiting to try again.
 *
 * @example
 * import {streamChatCompletion} from "/static/relay-client.js";
 * const stop = new AbortController();
 * const messages = [{role: "user", content: "Hello"}];
 * for await (const token of streamChatCompletion({model: "gpt-4o-mini", messages}, {signal: stop.signal}))
 *   output.textContent += token;
 *
 * @param {{model?: string, messages: Array<{role: string, content: unknown}>, [option: string]: unknown}} params
 *   the request body: `model`, `messages` and any option the relay passes on (`temperature`...)
 * @param {{
 *   signal?: AbortSignal,
 *   baseUrl?: string,
 *   token?: string,
 *   onReconnect?: (reconnect: {attempt: number, delayMs: number}) => void,
 *   onResumed?: (resumed: {attempt: number}) => void,
 * }} [options]
 *   `signal` cancels the answer; `baseUrl` is the relay's origin when it is not this page's
 *   (e.g. "https://relay.example.com"); `token` is sent as `Authorization: Bearer <token>`
 *   for relays that set RELAY_ACCESS_TOKENS. `onReconnect` is called when the connection was
 *   lost, before each try to resume (`attempt` counts from 1; the try starts `delayMs` later),
 *   e.g. to show "reconnecting…"; `onResumed` when the first event after a drop has arrived.
 *   Both are called synchronously: an exception thrown by one ends the answer with it.
 * @returns {AsyncGenerator<string, void, undefined>}
 */
export async function* streamChatCompletion(params, {signal, baseUrl = "", token, onReconnect, onResumed} = {}) {
  signal?.throwIfAborted();
  // One controller of our own, so that leaving the loop early can cancel the request too.
  const request = new AbortController();
  const forwardAbort = () => request.abort(signal.reason);
  signal?.addEventListener("abort", forwardAbort, {once: true});
  const relay = {baseUrl: baseUrl.replace(/\/+$/, ""), token, signal: request.signal};
  const position = {streamId: null, lastEventId: ""};
  let ended = false;  // the relay sent `done` or `error`: nothing is left to cancel
  let cancelled = false;
  const abandon = () => {
    if (ended || cancelled || !position.streamId) return;
    cancelled = true;
    cancelAnswer(position.streamId, relay);
  };
  // A page that is reloaded or closed mid-answer runs no `finally`, and the answer's id goes with
  // it: nobody could resume the answer, yet the relay would keep it (and its upstream, and the
  // caller's stream slot) for RELAY_RESUME_SECONDS.
  globalThis.addEventListener?.("pagehide", abandon);
  try {
    const response = await send(params, relay);
    await checkEventStream(response, relay.signal);
    for await (const event of answerEvents(response, position, relay, {onReconnect, onResumed})) {
      ended = event.type === "done" || event.type === "error";
      if (event.type === "message") yield tokenOf(event.data);
      else if (event.type === "error") throw streamError(event.data);
      else if (event.type === "done") return;
    }
  } finally {
    signal?.removeEventListener("abort", forwardAbort);
    globalThis.removeEventListener?.("pagehide", abandon);
    request.abort();  // a no-op once the body is read; otherwise it hangs up on the relay
    abandon();
  }
}

/**
 * Tell the relay that nobody will resume this answer, so it stops the upstream now instead of
 * waiting RELAY_RESUME_SECONDS for a resume. Fire and forget: `keepalive` lets it outlive the page.
 */
function cancelAnswer(streamId, relay) {
  const url = `${relay.baseUrl}/api/streams/${encodeURIComponent(streamId)}`;
  fetch(url, {method: "DELETE", headers: authorization(relay), keepalive: true}).catch(() => {});
}

async function send(params, relay) {
  const headers = {
    "Content-Type": "application/json",
    "Accept": "text/event-stream",
    "X-Relay-Resumable": "1",  // ignored by a relay without RELAY_RESUME_SECONDS
    ...authorization(relay),
  };
  const url = `${relay.baseUrl}/api/stream_chat_completion`;
  try {
    return await fetch(url, {method: "POST", headers, body: JSON.stringify(params), signal: relay.signal});
  } catch (error) {
    throw connectionError(error, relay.signal);
  }
}

function authorization({token}) {
  return token ? {"Authorization": `Bearer ${token}`} : {};
}

/**
 * The relay's events for one answer, across as many connections as it takes: when a resumable
 * answer's connection fails, the rest comes from a resume request. It never ends by itself: the
 * caller stops reading at `done` or `error`, so a body that runs out was cut off.
 */
async function* answerEvents(response, position, relay, {onReconnect, onResumed}) {
  position.streamId = response.headers.get(STREAM_ID_HEADER);
  let body = response.body;
  let attempts = 0;  // tries to resume since an event last arrived
  for (;;) {
    let cut;
    try {
      for await (const event of serverSentEvents(body, relay.signal, position.lastEventId)) {
        position.lastEventId = event.lastEventId;
        if (event.type === "meta") position.streamId ??= streamIdOf(event.data);
        if (attempts) onResumed?.({attempt: attempts});
        attempts = 0;
        yield event;
      }
      cut = new RelayError("The answer was cut off: the relay's stream ended before it was complete.", {
        code: "incomplete_stream",
      });
    } catch (error) {
      if (relay.signal.aborted || !(error instanceof RelayError)) throw error;
      cut = error;
    }
    if (!position.streamId) throw cut;  // not resumable: the relay has resume off
    ({body, attempts} = await resume(position, relay, {cut, attempts, onReconnect}));
  }
}

/** The meta event's `stream_id`, or null: any meta without one still starts an answer. */
function streamIdOf(data) {
  try {
    const {stream_id: streamId} = JSON.parse(data);
    return typeof streamId === "string" && streamId ? streamId : null;
  } catch {
    return null;
  }
}

/**
 * Wait, then ask for the rest of a cut answer, until the relay sends it: returns its body and the
 * attempts used. Throws when the relay refuses (the answer cannot come back) or attempts run out.
 */
async function resume(position, relay, {cut, attempts, onReconnect}) {
  let failure = cut;
  while (attempts < RESUME_ATTEMPTS) {
    attempts += 1;
    const delayMs = backoffDelay(attempts);
    onReconnect?.({attempt: attempts, delayMs});
    await sleep(delayMs, relay.signal);
    try {
      return {body: (await requestRest(position, relay)).body, attempts};
    } catch (error) {
      if (relay.signal.aborted) throw error;
      if (!worthRetrying(error)) throw notResumed(cut, error);
      failure = error;
    }
  }
  throw notResumed(cut, failure);
}

async function requestRest({streamId, lastEventId}, relay) {
  const headers = {"Accept": "text/event-stream", ...authorization(relay)};
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;  // none yet: the relay replays from the start
  const url = `${relay.baseUrl}/api/streams/${encodeURIComponent(streamId)}`;
  let response;
  try {
    response = await fetch(url, {headers, cache: "no-store", signal: relay.signal});
  } catch (error) {
    throw connectionError(error, relay.signal);
  }
  await checkEventStream(response, relay.signal);
  return response;
}

/** Network errors and overloaded or restarting servers pass; a 4xx means the answer is gone for good. */
function worthRetrying(error) {
  return error.status === null || error.status === 408 || error.status === 429 || error.status >= 500;
}

function notResumed(cut, failure) {
  const why = failure === cut ? "every try was cut off too" : failure.message;
  const said = /[.!?]$/.test(cut.message) ? cut.message : `${cut.message}.`;
  return new RelayError(`${said} Resuming the answer failed: ${why}`, {
    code: cut.code,
    cause: failure === cut ? cut.cause : failure,
  });
}

function backoffDelay(attempt) {
  const delay = Math.min(RESUME_FIRST_DELAY_MS * 2 ** (attempt - 1), RESUME_MAX_DELAY_MS);
  return Math.round(delay * (0.8 + 0.4 * Math.random()));
}

/** Resolves after `ms`, or rejects with the abort reason as soon as `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    signal.throwIfAborted();
    const wake = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", wake);
      resolve();
    }, ms);
    signal.addEventListener("abort", wake, {once: true});
  });
}

/** Throws the RelayError a response is when it is not the relay's event stream. */
async function checkEventStream(response, signal) {
  if (!response.ok) throw await httpError(response, signal);
  const type = response.headers.get("Content-Type") ?? "";
  if (!type.toLowerCase().startsWith("text/event-stream")) {
    // A 200 that is no event stream: a captive portal's or a proxy's page in the relay's place.
    response.body?.cancel().catch(() => {});
    throw new RelayError(`The relay answered HTTP ${response.status} with ${type || "no content type"}, not events.`, {
      code: "bad_response",
      status: response.status,
    });
  }
}

async function httpError(response, signal) {
  const body = await response.text().catch((error) => {
    throw connectionError(error, signal);
  });
  let error;
  try {
    error = JSON.parse(body).error;
  } catch {
    error = null;
  }
  if (!error || typeof error.message !== "string") {
    // Not the relay's own answer: a proxy or load balancer in front of it refused.
    const status = `${response.status} ${response.statusText}`.trim();
    return new RelayError(`The relay answered HTTP ${status} without an error message.`, {
      code: "bad_response",
      status: response.status,
    });
  }
  return new RelayError(error.message, {code: error.code, type: error.type, status: response.status});
}

function streamError(data) {
  const error = parseJson(data).error ?? {};
  return new RelayError(error.message ?? "The answer failed part-way.", {
    code: error.code ?? "bad_response",
    type: error.type,
  });
}

function tokenOf(data) {
  const {content} = parseJson(data);
  if (typeof content !== "string") {
    throw new RelayError("The relay sent a token event without content.", {code: "bad_response"});
  }
  return content;
}

function parseJson(data) {
  try {
    return JSON.parse(data);
  } catch (cause) {
    throw new RelayError("The relay sent an event that is not JSON.", {code: "bad_response", cause});
  }
}

function connectionError(error, signal) {
  if (signal.aborted) return signal.reason;
  return new RelayError(`The connection to the relay failed: ${error.message}`, {
    code: "connection_failed",
    cause: error,
  });
}

/**
 * The events of a server-sent-event body, as {type, data, lastEventId}, parsed as the WHATWG spec
 * says: LF, CR or CRLF line ends (a CRLF may be split between reads), UTF-8 characters split
 * between reads, comments (`: ping`) and blocks without data skipped, an unfinished last event
 * dropped. `lastEventId` is the last `id` field seen up to the event (one containing NUL is
 * ignored); it carries on from `lastEventId` given, as it does over an EventSource's reconnection.
 */
async function* serverSentEvents(body, signal, lastEventId = "") {
  const reader = body.getReader();
  const decoder = new TextDecoder();  // UTF-8; with {stream: true} it holds a split character back
  let pending = "";
  let type = "";
  let data = [];
  for (;;) {
    const {value, done} = await reader.read().catch((error) => {
      throw connectionError(error, signal);
    });
    pending += done ? decoder.decode() : decoder.decode(value, {stream: true});
    // A CR at the very end may be the first half of a CRLF: keep it until the next read, or the end.
    const end = pending.endsWith("\r") && !done ? pending.length - 1 : pending.length;
    const lines = pending.slice(0, end).split(/\r\n|\r|\n/);
    pending = lines.pop() + pending.slice(end);
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield {type: type || "message", data: data.join("\n"), lastEventId};
        type = "";
        data = [];
        continue;
      }
      const [field, fieldValue] = splitField(line);
      if (field === "event") type = fieldValue;
      else if (field === "data") data.push(fieldValue);
      else if (field === "id" && !fieldValue.includes("\0")) lastEventId = fieldValue;
    }
    if (done) return;  // an event without its blank line is dropped, as the spec says
  }
}

function splitField(line) {
  const colon = line.indexOf(":");
  if (colon === -1) return [line, ""];
  const value = line.slice(colon + 1);
  return [line.slice(0, colon), value.startsWith(" ") ? value.slice(1) : value];
}
