/**
 * chat.js — the chat page at GET /: one conversation, kept in this page, streamed through relay-client.js.
 *
 * It is a working example of the client module, not a product: nothing is stored, answers are
 * shown as plain text (no Markdown), and there is one conversation per page load.
 */
import {streamChatCompletion} from "./relay-client.js";

const byId = (id) => document.getElementById(id);
const conversation = byId("conversation");
const composer = byId("composer");
const questionBox = byId("question");
const sendButton = byId("send");
const stopButton = byId("stop");
const modelBox = byId("model");
const tokenBox = byId("token");

/** The conversation as the model sees it: each question with the answer (or part of one) it got. */
const messages = [];
/** Aborts the answer being streamed; null while idle. */
let answering = null;

composer.addEventListener("submit", (event) => {
  event.preventDefault();
  ask();
});
questionBox.addEventListener("keydown", (event) => {
  // Enter sends and Shift+Enter breaks the line; an input method composing Japanese owns Enter.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});
stopButton.addEventListener("click", () => answering?.abort());
showMode();

async function showMode() {
  try {
    const health = await (await fetch("/healthz")).json();
    if (health.upstream !== "demo") return;
    byId("demo-badge").hidden = false;
    modelBox.value ||= "demo";
  } catch {
    // The badge is only a hint: a page whose /healthz fails can still chat.
  }
}

async function ask() {
  const question = questionBox.value.trim();
  if (!question || answering) return;
  questionBox.value = "";
  const asked = {role: "user", content: question};
  addMessage("user").text.data = question;
  const answer = addMessage("assistant");
  answering = new AbortController();
  setAnswering(answer, true);
  try {
    const tokens = streamChatCompletion(requestBody([...messages, asked]), {
      signal: answering.signal,
      token: tokenBox.value || undefined,
      onReconnect: () => showReconnecting(answer),
    });
    for await (const token of tokens) {
      clearReconnecting(answer);
      const follow = isScrolledToEnd();  // only follow the answer if the reader has not scrolled up
      answer.text.appendData(token);
      if (follow) scrollToEnd();
    }
  } catch (error) {
    showFailure(answer, error);
  } finally {
    clearReconnecting(answer);
    remember(asked, answer.text.data, question);
    setAnswering(answer, false);
    answering = null;
  }
}

function requestBody(history) {
  const model = modelBox.value.trim();
  return model ? {model, messages: history} : {messages: history};
}

/** Keep what the user saw; a question that got no answer at all goes back in the box instead. */
function remember(asked, answerText, question) {
  if (answerText) {
    messages.push(asked, {role: "assistant", content: answerText});
  } else if (!questionBox.value) {
    questionBox.value = question;
  }
}

function addMessage(role) {
  byId("hint").hidden = true;
  const element = document.createElement("article");
  element.className = `message ${role}`;
  const text = document.createTextNode("");  // one node that tokens are appended to
  const body = document.createElement("div");
  body.className = "text";
  body.append(text);
  element.append(body);
  conversation.append(element);
  scrollToEnd();
  return {element, text};
}

/** The connection dropped and relay-client.js is resuming the answer: say so until tokens flow again. */
function showReconnecting(answer) {
  if (answer.element.querySelector(".note.reconnecting")) return;  // one note for all the tries
  const note = document.createElement("p");
  note.className = "note reconnecting";
  note.textContent = "Connection lost — resuming…";
  answer.element.append(note);
}

function clearReconnecting(answer) {
  answer.element.querySelector(".note.reconnecting")?.remove();
}

function showFailure(answer, error) {
  const note = document.createElement("p");
  if (error?.name === "AbortError") {
    note.className = "note stopped";
    note.textContent = "Stopped.";
  } else {
    note.className = "note error";
    note.setAttribute("role", "alert");
    note.textContent = error?.message ?? String(error);
    if (error?.code) {
      const code = document.createElement("span");
      code.className = "code";
      code.textContent = error.code;
      note.append(code);
    }
    if (error?.code === "unauthorized") askForToken();
  }
  answer.element.append(note);
}

function askForToken() {
  byId("token-row").hidden = false;
  tokenBox.focus();
}

function setAnswering(answer, busy) {
  answer.element.setAttribute("aria-busy", String(busy));
  // Hiding the focused button would drop the focus on the page: hand it to the question box.
  const buttonHadFocus = [sendButton, stopButton].includes(document.activeElement);
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  if (buttonHadFocus) questionBox.focus({preventScroll: true});
}

function scrollToEnd() {
  conversation.scrollTop = conversation.scrollHeight;
}

function isScrolledToEnd() {
  const {scrollTop, scrollHeight, clientHeight} = conversation;
  return scrollHeight - scrollTop - clientHeight < 40;
}
